"""Property-based tests (hypothesis): random shapes, strides, paddings, dilations, groups, deform
groups, dtypes and offsets (fractional, exactly on pixels, on the map's border, far outside, NaN and
+-inf) against the pure-PyTorch references, forward and every gradient.

The reference runs in the dtype the kernel computes in (float16/bfloat16 kernels compute in float32),
so both see the same sample positions and the comparison is exact up to summation order (and the
final rounding of reduced precision). Non-finite offsets must read zero and get zero gradient.
"""

import pytest
import torch

from mmdcnv2.ops import deform_conv2d, deform_conv2d_reference, deform_roi_pool, deform_roi_pool_reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# relative rounding of the result's dtype (the kernel's float32 result is rounded once)
ROUND = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _close(got, want, dtype, what):
    """got (kernel, dtype) against want (reference, compute dtype), relative to want's scale."""
    assert got.dtype == dtype, what
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = 1.0 + float(want.abs().max()) if want.numel() else 1.0
    tol = ROUND[dtype]
    torch.testing.assert_close(
        got.to(want.dtype),
        want.to(dtype).to(want.dtype),
        rtol=4 * tol,
        atol=4 * tol * scale,
        msg=lambda m: f"{what}: {m}",
    )


def _offsets(g, shape, H, W, kinds, dtype):
    """Offsets mixing the requested kinds element by element."""
    n = len(kinds)
    pick = torch.randint(0, n, shape, generator=g)
    out = torch.empty(shape, dtype=torch.float64)
    far = float(max(H, W) + 2)
    for i, kind in enumerate(kinds):
        if kind == "fractional":
            v = torch.randn(shape, generator=g, dtype=torch.float64) * 2
        elif kind == "eighths":  # exactly on pixels (multiples of 1) and on pixel borders
            v = torch.randint(-4 * 8, 4 * 8 + 1, shape, generator=g).double() / 8
        elif kind == "border":  # lands exactly on -1, 0, H - 1, H (and the same for W) from any tap
            v = torch.randint(-H - 4, H + 4, shape, generator=g).double()
        elif kind == "far":
            v = (torch.rand(shape, generator=g, dtype=torch.float64) * 100 + far) * (
                torch.randint(0, 2, shape, generator=g) * 2 - 1
            )
        else:  # "nonfinite"
            v = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=torch.float64)[
                torch.randint(0, 3, shape, generator=g)
            ]
        out = torch.where(pick == i, v, out)
    return out.to(dtype)


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 2))
    dg = draw(st.integers(1, 3))
    cin = groups * dg * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    H = draw(st.integers(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 7))
    W = draw(st.integers(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 7))
    return dict(
        N=draw(st.integers(1, 2)),
        cin=cin,
        cout=cout,
        k=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        dg=dg,
        H=H,
        W=W,
        dtype=draw(st.sampled_from(DTYPES)),
        mask=draw(st.booleans()),
        bias=draw(st.booleans()),
        kinds=draw(
            st.lists(
                st.sampled_from(["fractional", "eighths", "border", "far", "nonfinite"]),
                min_size=1,
                max_size=3,
                unique=True,
            )
        ),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _conv_tensors(c):
    g = torch.Generator().manual_seed(c["seed"])
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = c["k"], c["stride"], c["padding"], c["dilation"]
    Ho = (c["H"] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (c["W"] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    dt = c["dtype"]
    x = torch.randn(c["N"], c["cin"], c["H"], c["W"], generator=g).to(dt)
    off = _offsets(g, (c["N"], 2 * c["dg"] * kh * kw, Ho, Wo), c["H"], c["W"], c["kinds"], dt)
    w = torch.randn(c["cout"], c["cin"] // c["groups"], kh, kw, generator=g).to(dt)
    m = torch.rand(c["N"], c["dg"] * kh * kw, Ho, Wo, generator=g).to(dt) if c["mask"] else None
    b = torch.randn(c["cout"], generator=g).to(dt) if c["bias"] else None
    gout = torch.randn(c["N"], c["cout"], Ho, Wo, generator=g).to(dt)
    return x, off, w, b, m, gout


def _conv_run(fn, tensors, c, cast):
    x, off, w, b, m, gout = (t.to(cast).requires_grad_() if t is not None else None for t in _conv_tensors(c))
    gout = gout.detach()
    out = fn(x, off, w, b, c["stride"], c["padding"], c["dilation"], mask=m)
    leaves = [t for t in (x, off, w, m, b) if t is not None]
    grads = torch.autograd.grad(out, leaves, gout)
    return out.detach(), grads


@settings(max_examples=100, **SETTINGS)
@given(conv_cases())
def test_deform_conv2d_matches_reference(c):
    dt = c["dtype"]
    got, got_grads = _conv_run(deform_conv2d, None, c, dt)
    want, want_grads = _conv_run(deform_conv2d_reference, None, c, _compute_dtype(dt))
    _close(got, want, dt, "output")
    names = [
        n
        for n, on in (("input", True), ("offset", True), ("weight", True), ("mask", c["mask"]), ("bias", c["bias"]))
        if on
    ]
    for name, gg, wg in zip(names, got_grads, want_grads):
        _close(gg, wg, dt, f"grad_{name}")


@settings(max_examples=40, **SETTINGS)
@given(conv_cases(), st.sampled_from([float("nan"), float("inf"), -float("inf")]))
def test_deform_conv2d_nonfinite_offset_reads_zero(c, bad):
    """A non-finite offset component makes its sample read zero, exactly like a sample far outside the
    map, and gives that offset (and its partner) zero gradient."""
    c = dict(c, kinds=["fractional", "eighths"], dtype=torch.float64)
    x, off, w, b, m, gout = _conv_tensors(c)
    hit = torch.rand(off.shape, generator=torch.Generator().manual_seed(c["seed"])) < 0.3
    with_bad = torch.where(hit, torch.full_like(off, bad), off)
    outside = torch.where(hit, torch.full_like(off, -1e6), off)

    def run(o):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, o, w, m, b)]
        out = deform_conv2d(
            leaves[0], leaves[1], leaves[2], leaves[4], c["stride"], c["padding"], c["dilation"], mask=leaves[3]
        )
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], gout)
        return out, grads

    out_bad, grads_bad = run(with_bad)
    out_out, grads_out = run(outside)
    torch.testing.assert_close(out_bad, out_out, rtol=0, atol=0)
    for gb, go in zip(grads_bad, grads_out):
        torch.testing.assert_close(gb, go, rtol=0, atol=0)
    # the partner of a bad component (dy <-> dx) samples outside too: both get zero gradient
    pair = hit.view(off.shape[0], -1, 2, *off.shape[2:]).any(2, keepdim=True).expand(-1, -1, 2, -1, -1)
    assert (grads_bad[1][pair.reshape(off.shape)] == 0).all()


@st.composite
def pool_cases(draw):
    H, W = draw(st.integers(1, 8)), draw(st.integers(1, 8))
    scale = draw(st.sampled_from([1.0, 0.5, 0.25]))
    return dict(
        N=draw(st.integers(1, 2)),
        C=draw(st.integers(1, 4)),
        H=H,
        W=W,
        K=draw(st.integers(0, 4)),
        PH=draw(st.integers(1, 3)),
        PW=draw(st.integers(1, 3)),
        scale=scale,
        sampling_ratio=draw(st.integers(0, 3)),
        gamma=draw(st.sampled_from([0.0, 0.1, 1.0])),
        offset=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        kinds=draw(
            st.lists(
                st.sampled_from(["fractional", "eighths", "far", "nonfinite"]), min_size=1, max_size=3, unique=True
            )
        ),
        bad_roi=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def _pool_tensors(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt, K = c["dtype"], c["K"]
    x = torch.randn(c["N"], c["C"], c["H"], c["W"], generator=g).to(dt)
    img_h, img_w = c["H"] / c["scale"], c["W"] / c["scale"]
    # corners from a bit outside the image to past it; integer and fractional
    p1 = torch.rand(K, 2, generator=g) * torch.tensor([img_w, img_h]) * 1.2 - 2
    size = torch.rand(K, 2, generator=g) * torch.tensor([img_w, img_h]) * 1.2
    size = torch.where(torch.rand(K, 2, generator=g) < 0.2, size.round(), size)
    rois = torch.cat([torch.randint(0, c["N"], (K, 1), generator=g).float(), p1, p1 + size], 1).double()
    if c["bad_roi"] and K:
        rois[0, 1 + int(torch.randint(0, 4, (1,), generator=g))] = float("nan")
    off = _offsets(g, (K, 2, c["PH"], c["PW"]), c["H"], c["W"], c["kinds"], dt) / 4 if c["offset"] else None
    gout = torch.randn(K, c["C"], c["PH"], c["PW"], generator=g).to(dt)
    return x, rois.to(dt), off, gout


def _pool_run(fn, c, cast):
    x, rois, off, gout = _pool_tensors(c)
    x = x.to(cast).requires_grad_()
    off = off.to(cast).requires_grad_() if off is not None else None
    out = fn(x, rois.to(cast), off, (c["PH"], c["PW"]), c["scale"], c["sampling_ratio"], c["gamma"])
    leaves = [t for t in (x, off) if t is not None]
    if out.numel() == 0 or not out.requires_grad:  # (the reference's zeros for non-finite RoIs)
        return out.detach(), [torch.zeros_like(t) for t in leaves]
    grads = torch.autograd.grad(out, leaves, gout.to(cast), allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]


@settings(max_examples=100, **SETTINGS)
@given(pool_cases())
def test_deform_roi_pool_matches_reference(c):
    dt = c["dtype"]
    got, got_grads = _pool_run(deform_roi_pool, c, dt)
    want, want_grads = _pool_run(deform_roi_pool_reference, c, _compute_dtype(dt))
    _close(got, want, dt, "output")
    for name, gg, wg in zip(("input", "offset"), got_grads, want_grads):
        _close(gg, wg, dt, f"grad_{name}")
    if c["bad_roi"] and c["K"]:  # a RoI with a NaN coordinate pools nothing
        assert (got[0] == 0).all()
        if c["offset"]:
            assert (got_grads[1][0] == 0).all()
