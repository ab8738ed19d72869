"""Deformable RoI pooling against the pure-PyTorch reference and torchvision's roi_align."""

import pytest
import torch

from mmdcnv2.ops import (
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPoolPack,
    deform_roi_pool,
    deform_roi_pool_reference,
)


def make_rois(n_images, H, W, scale, count=6, dtype=torch.float64, kind="mixed"):
    """RoIs in image coordinates: inside, across the border, outside and degenerate ones."""
    g = torch.Generator().manual_seed(3)
    Hi, Wi = H / scale, W / scale
    rows = []
    for i in range(count):
        b = i % n_images
        x1, y1 = torch.rand(2, generator=g).tolist()
        w, h = (0.1 + 0.6 * torch.rand(2, generator=g)).tolist()
        x1, y1, x2, y2 = x1 * Wi * 0.8, y1 * Hi * 0.8, x1 * Wi * 0.8 + w * Wi, y1 * Hi * 0.8 + h * Hi
        rows.append([b, x1, y1, x2, y2])
    if kind == "mixed":
        rows += [
            [0, -0.3 * Wi, -0.2 * Hi, 0.4 * Wi, 0.5 * Hi],  # across the top-left border
            [n_images - 1, 0.7 * Wi, 0.6 * Hi, 1.3 * Wi, 1.4 * Hi],  # across the bottom-right border
            [0, 1.5 * Wi, 1.5 * Hi, 2.0 * Wi, 2.2 * Hi],  # wholly outside
            [0, 0.5 * Wi, 0.5 * Hi, 0.5 * Wi, 0.5 * Hi],  # zero area
            [n_images - 1, 0.6 * Wi, 0.6 * Hi, 0.2 * Wi, 0.3 * Hi],  # x2 < x1, y2 < y1
        ]
    return torch.tensor(rows, dtype=dtype)


def run(fn, x, rois, off, kw, seed=5):
    x = x.detach().clone().requires_grad_()
    off = off.detach().clone().requires_grad_() if off is not None else None
    out = fn(x, rois, off, **kw)
    g = torch.Generator(device=out.device).manual_seed(seed)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64, device=out.device).to(out.dtype)
    ins = [x] + ([off] if off is not None else [])
    return out, torch.autograd.grad(out, ins, go, allow_unused=True)


@pytest.mark.parametrize("output_size", [7, (3, 5), 1])
@pytest.mark.parametrize("sampling_ratio", [0, 1, 2])
@pytest.mark.parametrize("spatial_scale,gamma", [(0.25, 0.1), (1.0, 0.5), (0.125, 0.0)])
def test_against_reference(output_size, sampling_ratio, spatial_scale, gamma):
    N, C, H, W = 2, 5, 12, 15
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    rois = make_rois(N, H, W, spatial_scale)
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    off = torch.randn(rois.shape[0], 2, ph, pw, dtype=torch.float64) * 0.8
    kw = dict(output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=gamma)
    for o in (off, None):
        out, g = run(deform_roi_pool, x, rois, o, kw)
        ref, g_ref = run(deform_roi_pool_reference, x, rois, o, kw)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), atol=1e-10, rtol=1e-10)
        assert torch.isfinite(out).all()


def test_large_offsets_push_samples_off_the_map():
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    rois = make_rois(1, 8, 8, 1.0)
    off = torch.randn(rois.shape[0], 2, 4, 4, dtype=torch.float64) * 30
    kw = dict(output_size=4, spatial_scale=1.0, sampling_ratio=2, gamma=0.1)
    out, g = run(deform_roi_pool, x, rois, off, kw)
    ref, g_ref = run(deform_roi_pool_reference, x, rois, off, kw)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert torch.isfinite(out).all() and (out == 0).any()


@pytest.mark.parametrize("sampling_ratio", [0, 2, 3])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.25])
def test_zero_offset_equals_torchvision_roi_align(sampling_ratio, spatial_scale):
    tv = pytest.importorskip("torchvision")
    x = torch.randn(2, 4, 16, 20)
    rois = make_rois(2, 16, 20, spatial_scale, dtype=torch.float32, kind="inside")
    ref = tv.ops.roi_align(x, rois, (7, 7), spatial_scale, sampling_ratio, aligned=True)
    kw = dict(output_size=7, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=0.1)
    torch.testing.assert_close(deform_roi_pool(x, rois, None, **kw), ref, atol=1e-5, rtol=1e-5)
    zero = torch.zeros(rois.shape[0], 2, 7, 7)
    torch.testing.assert_close(deform_roi_pool(x, rois, zero, **kw), ref, atol=1e-5, rtol=1e-5)
    # and the input gradient of roi_align
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    go = torch.randn_like(ref)
    deform_roi_pool(xa, rois, None, **kw).backward(go)
    tv.ops.roi_align(xb, rois, (7, 7), spatial_scale, sampling_ratio, aligned=True).backward(go)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)


def test_gradcheck():
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor([[0, 1.2, 0.7, 4.9, 5.1], [1, 0.3, 2.2, 6.1, 4.8]], dtype=torch.float64)
    off = (torch.randn(2, 2, 2, 3, dtype=torch.float64) * 0.3).requires_grad_()
    fn = lambda x, off: deform_roi_pool(x, rois, off, (2, 3), 1.0, 2, 0.3)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, off), eps=1e-6, atol=1e-6)


def test_zero_rois():
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    rois = torch.zeros(0, 5)
    off = torch.zeros(0, 2, 7, 7, requires_grad=True)
    out = deform_roi_pool(x, rois, off, 7, 1.0, 0, 0.1)
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()
    assert torch.count_nonzero(x.grad) == 0 and x.grad.shape == x.shape


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_reduced_precision(dtype, tol):
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    rois = make_rois(2, 12, 12, 0.5)
    off = torch.randn(rois.shape[0], 2, 7, 7, dtype=torch.float64) * 0.5
    kw = dict(output_size=7, spatial_scale=0.5, sampling_ratio=2, gamma=0.1)
    low = [t.to(dtype) for t in (x, rois, off)]
    out, g = run(deform_roi_pool, *low, kw)
    ref, g_ref = run(deform_roi_pool_reference, *[t.double() for t in low], kw)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.double(), b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol)


def test_autocast_cpu():
    pool = ModulatedDeformRoIPoolPack(7, 4, deform_fc_channels=16, spatial_scale=0.5)
    x = torch.randn(1, 4, 10, 10)
    rois = make_rois(1, 10, 10, 0.5, dtype=torch.float32, kind="inside")
    ref = pool(x, rois)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(x, rois)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


def test_pack_modules_initialisation_and_state_dict_keys():
    rois = make_rois(2, 10, 12, 0.5, dtype=torch.float32, kind="inside")
    x = torch.randn(2, 6, 10, 12)
    plain = DeformRoIPool(7, spatial_scale=0.5)(x, rois)
    p = DeformRoIPoolPack(7, 6, deform_fc_channels=32, spatial_scale=0.5)
    torch.testing.assert_close(p(x, rois), plain)  # zero-initialised offsets
    m = ModulatedDeformRoIPoolPack(7, 6, deform_fc_channels=32, spatial_scale=0.5)
    torch.testing.assert_close(m(x, rois), 0.5 * plain)  # mask starts at sigmoid(0)
    assert list(m.state_dict()) == [
        "offset_fc.0.weight",
        "offset_fc.0.bias",
        "offset_fc.2.weight",
        "offset_fc.2.bias",
        "offset_fc.4.weight",
        "offset_fc.4.bias",
        "mask_fc.0.weight",
        "mask_fc.0.bias",
        "mask_fc.2.weight",
        "mask_fc.2.bias",
    ]
    # gradients reach both branches once their last layers are non-zero
    with torch.no_grad():
        m.offset_fc[4].weight.normal_(0, 0.01)
        m.mask_fc[2].weight.normal_(0, 0.01)
    m(x, rois).sum().backward()
    assert m.offset_fc[0].weight.grad.abs().sum() > 0 and m.mask_fc[0].weight.grad.abs().sum() > 0


def test_state_dict_loads_mmcv_module():
    try:
        import mmcv.ops as mmcv_ops
    except ImportError as e:
        pytest.skip(f"mmcv.ops not importable: {e}")
    theirs = mmcv_ops.ModulatedDeformRoIPoolPack(7, 8, deform_fc_channels=16, spatial_scale=0.25)
    ours = ModulatedDeformRoIPoolPack(7, 8, deform_fc_channels=16, spatial_scale=0.25)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs2 = mmcv_ops.DeformRoIPoolPack(7, 8, deform_fc_channels=16)
    DeformRoIPoolPack(7, 8, deform_fc_channels=16).load_state_dict(theirs2.state_dict(), strict=True)


def _op_args():
    x = torch.randn(2, 3, 8, 9, requires_grad=True)
    rois = make_rois(2, 8, 9, 1.0, count=4, dtype=torch.float32, kind="inside")
    off = (torch.randn(rois.shape[0], 2, 3, 3) * 0.2).requires_grad_()
    return x, rois, off


@pytest.mark.fake_kernels
@pytest.mark.parametrize("with_offset", [True, False])
def test_opcheck(with_offset):
    x, rois, off = _op_args()
    torch.library.opcheck(
        torch.ops.mmdcnv2.deform_roi_pool.default, (x, rois, off if with_offset else None, 3, 3, 1.0, 2, 0.1)
    )


@pytest.mark.fake_kernels
def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    pool = ModulatedDeformRoIPoolPack(3, 3, deform_fc_channels=8)
    with torch.no_grad():
        pool.offset_fc[4].weight.normal_(0, 0.1)
    x, rois, _ = _op_args()
    out_c = torch.compile(pool, fullgraph=True)(x, rois)
    out_e = pool(x, rois)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    (gc,) = torch.autograd.grad(out_c.sum(), x)
    (ge,) = torch.autograd.grad(out_e.sum(), x)
    torch.testing.assert_close(gc, ge, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name,call",
    [
        ("input", lambda x, r, o: deform_roi_pool(x[0], r, o, 3)),
        ("rois", lambda x, r, o: deform_roi_pool(x, r[:, :4], o, 3)),
        ("offset", lambda x, r, o: deform_roi_pool(x, r, o[:, :, :2], 3)),
        ("offset", lambda x, r, o: deform_roi_pool(x, r, o, 4)),
        ("rois", lambda x, r, o: deform_roi_pool(x, r.double(), o, 3)),
        ("batch index", lambda x, r, o: deform_roi_pool(x, r + torch.tensor([5.0, 0, 0, 0, 0]), o, 3)),
        ("batch index", lambda x, r, o: deform_roi_pool(x, r - torch.tensor([1.0, 0, 0, 0, 0]), o, 3)),
        ("sampling_ratio", lambda x, r, o: deform_roi_pool(x, r, o, 3, sampling_ratio=-1)),
        ("spatial_scale", lambda x, r, o: deform_roi_pool(x, r, o, 3, spatial_scale=0.0)),
        ("output_size", lambda x, r, o: torch.ops.mmdcnv2.deform_roi_pool(x, r, None, 0, 3, 1.0, 0, 0.1)),
        ("output_channels", lambda x, r, o: DeformRoIPoolPack(3, 5, deform_fc_channels=4)(x, r)),
    ],
)
def test_bad_input_names_the_argument(name, call):
    x, rois, off = _op_args()
    with pytest.raises((ValueError, RuntimeError, TypeError), match=name):
        call(x.detach(), rois, off.detach())


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)]
)
def test_cuda_matches_reference(dtype, tol):
    x = torch.randn(2, 40, 12, 12, dtype=torch.float64)
    rois = make_rois(2, 12, 12, 0.5)
    off = torch.randn(rois.shape[0], 2, 7, 7, dtype=torch.float64) * 0.5
    kw = dict(output_size=7, spatial_scale=0.5, sampling_ratio=0, gamma=0.1)
    low = [t.to(dtype) for t in (x, rois, off)]
    out, g = run(deform_roi_pool, *[t.cuda() for t in low], kw)
    ref, g_ref = run(deform_roi_pool_reference, *[t.double() for t in low], kw)
    torch.testing.assert_close(out.cpu().double(), ref, atol=tol, rtol=tol)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a.cpu().double(), b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol)
