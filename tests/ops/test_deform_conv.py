"""Deformable convolution ops against the pure-PyTorch reference, torchvision and mmcv."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mmdcnv2.ops import (
    DeformConv2d,
    DeformConv2dPack,
    ModulatedDeformConv2d,
    ModulatedDeformConv2dPack,
    deform_conv2d,
    deform_conv2d_reference,
)

# (N, C, H, W, Cout, kh, kw, stride, padding, dilation, groups, deform_groups)
CASES = [
    (2, 4, 7, 6, 6, 3, 3, 1, 1, 1, 1, 1),
    (1, 6, 5, 8, 4, 3, 2, 2, 1, 2, 2, 3),
    (3, 8, 9, 9, 8, 1, 3, 1, 0, 1, 4, 2),
    (1, 3, 6, 10, 5, 2, 4, (2, 1), (0, 2), (1, 2), 1, 3),
    (2, 16, 11, 7, 8, 3, 3, 2, 1, 1, 2, 4),
    (1, 2, 3, 3, 2, 5, 5, 1, 2, 1, 1, 2),  # kernel larger than the map
    (1, 12, 8, 8, 12, 3, 3, 1, 1, 1, 12, 1),  # depthwise
]


def _pair(v):
    return (v, v) if isinstance(v, int) else v


def make_inputs(case, dtype=torch.float64, mask=True, bias=True, offset_scale=3.0, device="cpu"):
    N, C, H, W, Cout, kh, kw, s, p, d, g, dg = case
    (sh, sw), (ph, pw), (dh, dw) = _pair(s), _pair(p), _pair(d)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    kw_ = dict(dtype=dtype, device=device)
    x = torch.randn(N, C, H, W, **kw_)
    off = torch.randn(N, 2 * dg * kh * kw, Ho, Wo, **kw_) * offset_scale
    m = torch.rand(N, dg * kh * kw, Ho, Wo, **kw_) if mask else None
    w = torch.randn(Cout, C // g, kh, kw, **kw_)
    b = torch.randn(Cout, **kw_) if bias else None
    return x, off, w, b, s, p, d, m


def grads(fn, x, off, w, b, s, p, d, m, seed=1):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, off, w, b, m)]
    x, off, w, b, m = leaves
    out = fn(x, off, w, b, s, p, d, m)
    g = torch.Generator(device=out.device).manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64, device=out.device).to(out.dtype)
    ins = [t for t in leaves if t is not None]
    return out, torch.autograd.grad(out, ins, go)


def assert_matches(fn_a, fn_b, args, atol, rtol):
    out_a, g_a = grads(fn_a, *args)
    out_b, g_b = grads(fn_b, *args)
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    for name, a, b in zip(["input", "offset", "weight", "bias", "mask"], g_a, g_b):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mask", [True, False])
def test_against_reference(case, mask):
    args = make_inputs(case, mask=mask, bias=mask)
    assert_matches(deform_conv2d, deform_conv2d_reference, args, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("where", ["integer", "border", "outside", "half"])
def test_offsets_on_pixels_borders_and_outside(where):
    case = (2, 4, 5, 6, 3, 3, 3, 1, 1, 1, 1, 2)
    x, off, w, b, s, p, d, m = make_inputs(case)
    if where == "integer":  # every sample exactly on a pixel
        off = torch.randint(-3, 4, off.shape).double()
    elif where == "border":  # samples exactly on -1, 0, H-1, H (and W) lines
        H, W = x.shape[2:]
        choices = torch.tensor([-1.0, 0.0, H - 1.0, float(H), -0.5, W - 1.0, float(W)], dtype=torch.float64)
        Ho, Wo = off.shape[2:]
        base_y = torch.arange(Ho).view(Ho, 1) - 1 + torch.div(torch.arange(9), 3, rounding_mode="floor").view(9, 1, 1)
        tgt = choices[torch.randint(0, len(choices), off.shape)]
        off = off.clone()
        off[:, 0::2] = tgt[:, 0::2] - base_y.repeat(2, 1, 1).double()  # absolute row = chosen value
    elif where == "outside":
        off = off * 100
    else:
        off = torch.randint(-6, 7, off.shape).double() + 0.5
    assert_matches(deform_conv2d, deform_conv2d_reference, (x, off, w, b, s, p, d, m), atol=1e-10, rtol=1e-10)


def test_gradcheck():
    case = (2, 4, 5, 4, 4, 3, 3, 1, 1, 1, 2, 2)
    x, off, w, b, s, p, d, m = make_inputs(case, offset_scale=1.0)
    # keep samples away from integer grid lines, where the bilinear weights have kinks
    off = torch.floor(off) + 0.2 + 0.6 * torch.rand_like(off)
    ins = [t.requires_grad_() for t in (x, off, w, b, m)]
    fn = lambda x, off, w, b, m: deform_conv2d(x, off, w, b, s, p, d, m)  # noqa: E731
    assert torch.autograd.gradcheck(fn, ins, eps=1e-6, atol=1e-5)
    fn1 = lambda x, off, w: deform_conv2d(x, off, w, None, s, p, d)  # noqa: E731
    assert torch.autograd.gradcheck(fn1, ins[:3], eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("case", CASES[:5])
@pytest.mark.parametrize("mask", [True, False])
def test_against_torchvision(case, mask):
    tv = pytest.importorskip("torchvision")
    args = make_inputs(case, dtype=torch.float32, mask=mask, bias=True)
    assert_matches(deform_conv2d, tv.ops.deform_conv2d, args, atol=2e-4, rtol=2e-4)


def _mmcv_ops():
    if importlib.util.find_spec("mmcv") is None:
        pytest.skip("mmcv is not installed")
    try:
        import mmcv.ops as ops
    except ImportError as e:  # mmcv without its compiled ops
        pytest.skip(f"mmcv.ops does not import: {e}")
    return ops


@pytest.mark.parametrize("groups,deform_groups,stride", [(1, 1, 1), (2, 2, 1), (1, 4, 2)])
def test_modules_load_mmcv_state_dicts(groups, deform_groups, stride):
    mmcv_ops = _mmcv_ops()
    for ours_cls, theirs_cls in (
        (ModulatedDeformConv2dPack, mmcv_ops.ModulatedDeformConv2dPack),
        (DeformConv2dPack, mmcv_ops.DeformConv2dPack),
    ):
        theirs = theirs_cls(8, 8, 3, stride=stride, padding=1, groups=groups, deform_groups=deform_groups)
        with torch.no_grad():  # non-zero offsets, so that sampling really is deformable
            theirs.conv_offset.weight.normal_(0, 0.3)
            theirs.conv_offset.bias.normal_(0, 0.5)
        ours = ours_cls(8, 8, 3, stride=stride, padding=1, groups=groups, deform_groups=deform_groups)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict(), strict=True)
        x = torch.randn(2, 8, 9, 7)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = ours(xa), theirs(xb)
        torch.testing.assert_close(out_a, out_b, atol=1e-4, rtol=1e-4)
        go = torch.randn_like(out_a)
        out_a.backward(go)
        out_b.backward(go)
        torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)
        for (name, pa), (_, pb) in zip(ours.named_parameters(), theirs.named_parameters()):
            torch.testing.assert_close(pa.grad, pb.grad, atol=2e-4, rtol=2e-4, msg=lambda m: f"{name}: {m}")
        # and the other way round
        theirs.load_state_dict(ours.state_dict(), strict=True)


def test_pack_modules_start_as_plain_convolution():
    x = torch.randn(2, 6, 9, 8)
    m = DeformConv2dPack(6, 4, 3, stride=2, padding=1, groups=2)
    torch.testing.assert_close(m(x), F.conv2d(x, m.weight, None, 2, 1, 1, 2), atol=1e-5, rtol=1e-5)
    m = ModulatedDeformConv2dPack(6, 4, 3, padding=2, dilation=2, deform_groups=3)
    with torch.no_grad():
        m.bias.normal_()
    # zero offsets and mask sigmoid(0) = 0.5 at initialisation
    torch.testing.assert_close(
        m(x), 0.5 * F.conv2d(x, m.weight, None, 1, 2, 2) + m.bias.view(1, -1, 1, 1), atol=1e-5, rtol=1e-5
    )


def test_module_initialisation_matches_mmcv_rules():
    m = ModulatedDeformConv2d(8, 4, 3)
    bound = 1 / (8 * 9) ** 0.5
    assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.5 * bound
    assert torch.count_nonzero(m.bias) == 0
    d = DeformConv2d(8, 4, 3)
    assert d.weight.abs().max() <= (6 / (8 * 9)) ** 0.5  # kaiming_uniform, relu gain
    with pytest.raises(ValueError, match="bias"):
        DeformConv2d(8, 4, 3, bias=True)


def test_batch_zero():
    args = list(make_inputs((1, 4, 6, 6, 3, 3, 3, 1, 1, 1, 1, 1)))
    args[0] = args[0][:0]
    args[1] = args[1][:0]
    args[7] = args[7][:0]
    out, g = grads(deform_conv2d, *args)
    assert out.shape == (0, 3, 6, 6)
    assert g[0].shape == args[0].shape and g[2].abs().sum() == 0


def test_non_contiguous_and_channels_last():
    x, off, w, b, s, p, d, m = make_inputs((2, 8, 7, 9, 4, 3, 3, 1, 1, 1, 2, 2))
    ref, g_ref = grads(deform_conv2d, x, off, w, b, s, p, d, m)
    cl = [t.contiguous(memory_format=torch.channels_last) for t in (x, off, w, m)]
    out, g = grads(deform_conv2d, cl[0], cl[1], cl[2], b, s, p, d, cl[3])
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    for a, c in zip(g, g_ref):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=0)
    # transposed views (non-contiguous, not channels-last)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)
    offt = off.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous() and not offt.is_contiguous()
    out, _ = grads(deform_conv2d, xt, offt, w, b, s, p, d, m)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 8e-2)])
def test_reduced_precision(dtype, tol):
    args = make_inputs((2, 16, 8, 8, 8, 3, 3, 1, 1, 1, 1, 2), dtype=torch.float64, offset_scale=1.0)
    x, off, w, b, s, p, d, m = args
    w = w * 0.1
    low = [t.to(dtype) if t is not None else None for t in (x, off, w, b)]
    out, g = grads(deform_conv2d, low[0], low[1], low[2], low[3], s, p, d, m.to(dtype))
    ref, g_ref = grads(
        deform_conv2d_reference, *[t.to(dtype).double() for t in (x, off, w, b)], s, p, d, m.to(dtype).double()
    )
    assert out.dtype == dtype and all(t.dtype == dtype for t in g)
    torch.testing.assert_close(out.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
    for a, c in zip(g, g_ref):
        torch.testing.assert_close(a.double(), c, atol=tol * c.abs().max().item(), rtol=tol)


def test_autocast_cpu():
    m = ModulatedDeformConv2dPack(8, 8, 3, padding=1)
    with torch.no_grad():
        m.conv_offset.weight.normal_(0, 0.1)
    x = torch.randn(1, 8, 10, 10)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
        assert out.dtype == torch.float32  # the op runs in float32 under autocast
        out.sum().backward()
    # only conv_offset ran in bfloat16
    torch.testing.assert_close(out, ref, atol=0.1, rtol=0.05)
    assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()


def _op_args(mask, bias):
    x, off, w, b, s, p, d, m = make_inputs((2, 4, 6, 5, 6, 3, 3, 1, 1, 1, 2, 2), dtype=torch.float32)
    return (
        x.requires_grad_(),
        w.requires_grad_(),
        off.requires_grad_(),
        m.requires_grad_() if mask else None,
        b.requires_grad_() if bias else None,
        [1, 1],
        [1, 1],
        [1, 1],
        2,
        2,
    )


@pytest.mark.fake_kernels
@pytest.mark.parametrize("mask,bias", [(True, True), (False, False), (True, False)])
def test_opcheck(mask, bias):
    torch.library.opcheck(torch.ops.mmdcnv2.deform_conv2d.default, _op_args(mask, bias))


@pytest.mark.fake_kernels
@pytest.mark.parametrize("mask,bias", [(True, True), (False, False)])
def test_opcheck_channels_last(mask, bias):
    """The fake kernels promise the compiled op's memory formats (channels-last input: channels-last
    output and grad_input); opcheck compares their strides."""
    args = list(_op_args(mask, bias))
    args[0] = args[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(torch.ops.mmdcnv2.deform_conv2d.default, tuple(args))


@pytest.mark.parametrize(
    "dtype,route", [(torch.float64, "auto"), (torch.float32, "gemm"), (torch.float32, "conv"), (torch.float32, "tiled")]
)
@pytest.mark.parametrize("budget", [0, 20 << 10])
def test_channels_last_results_follow_the_input(dtype, route, budget):
    """A channels-last input gives a channels-last output and grad_input (no copy of the input), bit-identical
    to the plain NCHW call; a plain input gives plain contiguous results.
    A small budget cuts the conv route's chunks inside images."""
    from mmdcnv2.ops import column_budget, cpu_route

    x, off, w, b, s, p, d, m = make_inputs((3, 8, 7, 9, 6, 3, 3, 1, 1, 1, 1, 2), dtype=dtype)
    xcl = x.contiguous(memory_format=torch.channels_last)
    assert not xcl.is_contiguous()
    with cpu_route(route), column_budget(budget):
        out, g = grads(deform_conv2d, x, off, w, b, s, p, d, m)
        out_cl, g_cl = grads(deform_conv2d, xcl, off, w, b, s, p, d, m)
    assert out.is_contiguous() and g[0].is_contiguous()
    assert out_cl.is_contiguous(memory_format=torch.channels_last) and not out_cl.is_contiguous()
    assert g_cl[0].is_contiguous(memory_format=torch.channels_last) and not g_cl[0].is_contiguous()
    assert torch.equal(out_cl, out)
    for name, a, c in zip(["input", "offset", "weight", "bias", "mask"], g_cl, g):
        assert torch.equal(a, c), name


@pytest.mark.parametrize("cls", [ModulatedDeformConv2dPack, DeformConv2dPack])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pack_layers_keep_the_callers_layout(cls, dtype):
    """On the CPU the Pack layers run conv_offset and the op on a channels-last copy of a plain input;
    the caller still gets its own layout back, and the same values and gradients as the op called
    directly on the plain input with the same offsets."""
    torch.manual_seed(0)
    m = cls(8, 6, 3, padding=1, deform_groups=2).to(dtype)
    with torch.no_grad():
        m.conv_offset.weight.normal_(0, 0.3)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 8, 7, 9, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
        out = m(x)
        assert out.is_contiguous(memory_format=layout) and (layout == torch.channels_last) != out.is_contiguous()
        go = torch.randn_like(out)
        gx, gw = torch.autograd.grad(out, (x, m.weight), go)
        assert gx.is_contiguous(memory_format=layout)
        # the direct call: conv_offset and the op on the plain input
        xp = x.detach().contiguous().requires_grad_()
        raw = m.conv_offset(xp)
        if cls is ModulatedDeformConv2dPack:
            offset, mask = m.split_offset_mask(raw)
            ref = deform_conv2d(xp, offset, m.weight, m.bias, m.stride, m.padding, m.dilation, mask)
        else:
            ref = deform_conv2d(xp, raw, m.weight, None, m.stride, m.padding, m.dilation)
        rx, rw = torch.autograd.grad(ref, (xp, m.weight), go)
        tol = 1e-4 if dtype == torch.float32 else 1e-10
        torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
        torch.testing.assert_close(gx, rx, atol=tol, rtol=tol)
        torch.testing.assert_close(gw, rw, atol=tol, rtol=tol)


@pytest.mark.fake_kernels
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    m = ModulatedDeformConv2dPack(4, 6, 3, padding=1, deform_groups=2)
    with torch.no_grad():
        m.conv_offset.weight.normal_(0, 0.2)
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True)
    out_c = compiled(x)
    out_e = m(x)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    (gc,) = torch.autograd.grad(out_c.sum(), x)
    (ge,) = torch.autograd.grad(out_e.sum(), x)
    torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-5)


def _bad(**over):
    x, off, w, b, s, p, d, m = make_inputs((1, 4, 6, 6, 4, 3, 3, 1, 1, 1, 1, 1), dtype=torch.float32)
    args = dict(input=x, offset=off, weight=w, bias=b, stride=1, padding=1, dilation=1, mask=m)
    args.update(over)
    return args


BAD = [
    ("input", dict(input=torch.randn(4, 6, 6))),
    ("weight", dict(weight=torch.randn(4, 3, 3, 3))),  # 4 channels not a multiple of 3
    ("offset", dict(offset=torch.randn(1, 18, 5, 6))),
    ("offset", dict(offset=torch.randn(1, 17, 6, 6))),
    ("mask", dict(mask=torch.randn(1, 8, 6, 6))),
    ("bias", dict(bias=torch.randn(5))),
    ("stride", dict(stride=0)),
    ("dilation", dict(dilation=-1)),
    ("padding", dict(padding=-1)),
    ("dtype", dict(weight=torch.randn(4, 4, 3, 3, dtype=torch.float64))),
    ("groups", dict(weight=torch.randn(3, 2, 3, 3))),  # groups 2, 3 outputs
    ("deform_groups", dict(offset=torch.randn(1, 54, 6, 6), mask=torch.randn(1, 27, 6, 6))),
]


@pytest.mark.parametrize("name,over", BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_input_names_the_argument(name, over):
    with pytest.raises((ValueError, RuntimeError, TypeError), match=name):
        deform_conv2d(**_bad(**over))


@pytest.mark.parametrize(
    "name,over",
    [
        ("offset", dict(offset=torch.randn(1, 18, 5, 6))),
        ("mask", dict(mask=torch.randn(1, 9, 6, 7))),
        ("stride", dict(stride=[0, 1])),
        ("padding", dict(padding=[-1, 0])),
        ("groups", dict(groups=3)),
        ("deform_groups", dict(deform_groups=0)),
        ("input", dict(input=torch.randn(1, 4, 6))),
        ("bias", dict(bias=torch.randn(3))),
    ],
)
def test_compiled_op_checks_its_arguments(name, over):
    """The C++ op validates on its own, for callers that bypass the Python wrapper."""
    x, off, w, b, _, _, _, m = make_inputs((1, 4, 6, 6, 4, 3, 3, 1, 1, 1, 1, 1), dtype=torch.float32)
    args = dict(
        input=x,
        weight=w,
        offset=off,
        mask=m,
        bias=b,
        stride=[1, 1],
        padding=[1, 1],
        dilation=[1, 1],
        groups=1,
        deform_groups=1,
    )
    args.update(over)
    with pytest.raises(ValueError, match=name):
        torch.ops.mmdcnv2.deform_conv2d(*args.values())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 8e-2)]
)
@pytest.mark.parametrize("case", CASES[:5])
def test_cuda_matches_cpu(case, dtype, tol):
    args = make_inputs(case, dtype=torch.float64, offset_scale=1.0)
    x, off, w, b, s, p, d, m = args
    w = w * 0.1
    args = (x, off, w, b, s, p, d, m)
    low = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in args]
    out_g, g_g = grads(deform_conv2d, *[t.cuda() if isinstance(t, torch.Tensor) else t for t in low])
    out_c, g_c = grads(deform_conv2d_reference, *[t.double() if isinstance(t, torch.Tensor) else t for t in low])
    torch.testing.assert_close(out_g.double().cpu(), out_c, atol=tol * max(1, out_c.abs().max().item()), rtol=tol)
    for a, c in zip(g_g, g_c):
        torch.testing.assert_close(a.double().cpu(), c, atol=tol * max(1, c.abs().max().item()), rtol=tol)


@pytest.mark.gpu
def test_cuda_autocast_and_torchvision():
    tv = pytest.importorskip("torchvision")
    args = make_inputs((2, 16, 12, 12, 16, 3, 3, 1, 1, 1, 1, 2), dtype=torch.float32, device="cuda")
    assert_matches(deform_conv2d, tv.ops.deform_conv2d, args, atol=1e-3, rtol=1e-3)
    m = ModulatedDeformConv2dPack(8, 8, 3, padding=1).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        out = m(torch.randn(1, 8, 10, 10, device="cuda"))
    assert out.dtype == torch.float32


@pytest.mark.parametrize("budget", [0, 20 << 10])
@pytest.mark.parametrize("case", CASES)
def test_cpu_routes_float32_against_reference(case, budget):
    """The CPU routes of float32 (GEMM over row-major columns; oneDNN convolution over the column
    image, chunked by output rows: a small budget makes one-row chunks; the tiled route) against the
    float64 reference."""
    from mmdcnv2.ops import column_budget, cpu_route

    x, off, w, b, s, p, d, m = make_inputs(case, dtype=torch.float32, offset_scale=2.0)
    ref_args = [t.double() if isinstance(t, torch.Tensor) else t for t in (x, off, w, b, s, p, d, m)]
    out_ref, g_ref = grads(deform_conv2d_reference, *ref_args)
    for route in ("gemm", "conv", "tiled"):
        with cpu_route(route), column_budget(budget):
            out, g = grads(deform_conv2d, x, off, w, b, s, p, d, m)
            out2, g2 = grads(deform_conv2d, x, off, w, b, s, p, d, m)
        torch.testing.assert_close(out.double(), out_ref, atol=1e-4, rtol=1e-4)
        for name, a, r in zip(["input", "offset", "weight", "bias", "mask"], g, g_ref):
            torch.testing.assert_close(
                a.double(), r, atol=1e-3, rtol=1e-4, msg=lambda e: f"route {route} grad {name}: {e}"
            )
        assert torch.equal(out, out2) and all(torch.equal(a, a2) for a, a2 in zip(g, g2)), "not bit-reproducible"


def test_cpu_route_refuses_unknown_values():
    from mmdcnv2.ops import cpu_route

    with pytest.raises(ValueError, match="route"):
        torch.ops.mmdcnv2.set_cpu_route(4)
    with pytest.raises(ValueError, match="route"):
        cpu_route("mkl")


def test_many_column_chunks_across_images():
    """Large enough that the column buffer is filled in several chunks, some crossing an image border."""
    case = (3, 256, 30, 30, 8, 3, 3, 1, 1, 1, 2, 4)  # 2700 rows: two chunks of 1350, the cut inside image 1
    args = make_inputs(case, offset_scale=2.0)
    assert_matches(deform_conv2d, deform_conv2d_reference, args, atol=1e-9, rtol=1e-9)
