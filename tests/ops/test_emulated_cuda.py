"""The CUDA kernels' own source, run on the CPU through the host emulation of the device layer.

``torch.ops.mmdcnv2_emulated.*`` are the CUDA ops compiled by the host compiler over
csrc/common/device.h: every block, warp and lane of each grid runs (lanes as fibers that meet
at the shuffles), through the same driver, chunking and launch sizes as the CUDA build. Each
test compares them with the pure-PyTorch reference (and, for the defects of the CUDA review,
with the CPU kernels).
"""

import pathlib
import re
import subprocess

import pytest
import torch
from test_deform_conv import CASES, make_inputs
from test_deform_roi_pool import make_rois

from mmdcnv2.ops import (
    column_budget,
    deform_conv2d,
    deform_conv2d_reference,
    deform_roi_pool,
    deform_roi_pool_reference,
)
from mmdcnv2.ops.reference import MAX_ROI_SAMPLES

E = torch.ops.mmdcnv2_emulated
ROOT = pathlib.Path(__file__).resolve().parents[2]


def _cpu_half_mm() -> bool:
    try:
        torch.mm(torch.ones(2, 2, dtype=torch.float16), torch.ones(2, 2, dtype=torch.float16))
        return True
    except RuntimeError:  # torch < 2.2: no float16 matrix multiply on the CPU
        return False


CPU_HALF_MM = _cpu_half_mm()


def skip_without_cpu_half_mm(dtype):
    """The host emulation runs the GPU path's GEMMs on the CPU in the input's dtype."""
    if dtype == torch.float16 and not CPU_HALF_MM:
        pytest.skip(
            f"the host emulation needs float16 matmul on the CPU, which torch {torch.__version__} lacks "
            "(cuBLAS has it on a GPU)"
        )


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def conv_args(x, w, s, p, d, dg):
    return [_pair(s), _pair(p), _pair(d), x.shape[1] // w.shape[1], dg]


class _EmulatedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, off, w, b, m, args):
        ctx.save_for_backward(x, off, w, b, m)
        ctx.args = args
        return E.deform_conv2d(x, w, off, m, b, *args)

    @staticmethod
    def backward(ctx, go):
        x, off, w, b, m = ctx.saved_tensors
        gi, gw, goff, gm, gb = E.deform_conv2d_backward(go.contiguous(), x, w, off, m, b, *ctx.args)
        return gi, goff, gw, (gb if b is not None else None), (gm if m is not None else None), None


def emulated_conv(x, off, w, b, s, p, d, m):
    """The emulated CUDA op, forward and backward (torchvision's argument order)."""
    dg = off.shape[1] // (2 * w.shape[2] * w.shape[3])
    return _EmulatedConv.apply(x, off, w, b, m, conv_args(x, w, s, p, d, dg))


def check_conv(case_inputs, atol, rtol, ref_dtype=torch.float64, budget=0):
    """Emulated forward and every gradient against the reference's autograd, computed in ref_dtype
    from the same (possibly rounded) inputs."""
    x, off, w, b, s, p, d, m = case_inputs
    dg = off.shape[1] // (2 * w.shape[2] * w.shape[3])
    with column_budget(budget):
        out = emulated_conv(x, off, w, b, s, p, d, m)
        go = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
        gi, gw, goff, gm, gb = E.deform_conv2d_backward(go, x, w, off, m, b, *conv_args(x, w, s, p, d, dg))
    leaves = [t.detach().to(ref_dtype).requires_grad_() if t is not None else None for t in (x, off, w, b, m)]
    rx, roff, rw, rb, rm = leaves
    ref = deform_conv2d_reference(rx, roff, rw, rb, s, p, d, rm)
    torch.testing.assert_close(out.to(ref_dtype), ref.detach(), atol=atol, rtol=rtol, msg=lambda e: f"output: {e}")
    if ref.numel() == 0:
        return
    names = [n for n, t in zip(["input", "offset", "weight", "bias", "mask"], leaves) if t is not None]
    want = dict(zip(names, torch.autograd.grad(ref, [t for t in leaves if t is not None], go.to(ref_dtype))))
    got = dict(input=gi, offset=goff, weight=gw, bias=gb, mask=gm)
    for name, ref_g in want.items():
        torch.testing.assert_close(
            got[name].to(ref_dtype), ref_g, atol=atol, rtol=rtol, msg=lambda e: f"grad {name}: {e}"
        )


# --------------------------------------------------------------------------- deformable convolution


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mask", [True, False])
def test_emulated_deform_conv_float64(case, mask):
    check_conv(make_inputs(case, mask=mask, bias=mask), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", CASES[:3])
def test_emulated_deform_conv_float32(case):
    check_conv(make_inputs(case, dtype=torch.float32), atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
@pytest.mark.parametrize("case", [CASES[0], CASES[4]])
def test_emulated_deform_conv_reduced_precision(dtype, tol, case):
    """Native half/bfloat16 with float accumulation (as on a GPU), against the reference in float64
    on the same rounded inputs."""
    skip_without_cpu_half_mm(dtype)
    x, off, w, b, s, p, d, m = make_inputs(case, dtype=torch.float64, offset_scale=1.0)
    check_conv(
        [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (x, off, w, b, s, p, d, m)], atol=tol * 4, rtol=tol
    )


@pytest.mark.parametrize("where", ["integer", "border", "outside", "nonfinite"])
def test_emulated_deform_conv_offsets_on_pixels_borders_far_and_nonfinite(where):
    case = (2, 4, 5, 6, 3, 3, 3, 1, 1, 1, 1, 2)
    x, off, w, b, s, p, d, m = make_inputs(case)
    H, W = x.shape[2:]
    if where == "integer":
        off = torch.randint(-3, 4, off.shape).double()
    elif where == "border":
        choices = torch.tensor([-1.0, 0.0, H - 1.0, float(H), -0.5, W - 1.0, float(W)], dtype=torch.float64)
        off = choices[torch.randint(len(choices), off.shape)] - torch.randint(0, 3, off.shape).double()
    elif where == "outside":
        off = off.sign() * (100 + off.abs() * 1e6)
    else:
        off = off.clone()
        flat = off.view(-1)
        flat[::3] = float("nan")
        flat[1::7] = float("inf")
        flat[2::11] = -float("inf")
    check_conv((x, off, w, b, s, p, d, m), atol=1e-10, rtol=1e-10)


def test_emulated_deform_conv_many_chunks_across_images():
    """A tiny column budget: every chunk a few rows, chunks cut inside images."""
    case = (3, 5, 6, 7, 4, 3, 3, 1, 1, 1, 1, 5)
    args = make_inputs(case)
    x, w = args[0], args[2]
    rows_per_chunk = 5  # the budget holds 5 rows of columns (backward: two buffers); 42 rows an image
    row_bytes = w.shape[2] * w.shape[3] * x.shape[1] * x.element_size()
    plan = E.deform_conv2d_launch_plan(x, w, args[1], args[7], [1, 1], [1, 1], [1, 1], 1, 5)
    assert plan[1] > 100, plan  # without a budget: one chunk for the whole batch
    with column_budget(2 * rows_per_chunk * row_bytes):
        plan = E.deform_conv2d_launch_plan(x, w, args[1], args[7], [1, 1], [1, 1], [1, 1], 1, 5)
    assert plan[2] == rows_per_chunk and (6 * 7) % plan[2] != 0, plan  # some chunks straddle two images
    check_conv(args, atol=1e-10, rtol=1e-10, budget=2 * rows_per_chunk * row_bytes)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_emulated_deform_conv_channels_last(dtype):
    """A channels-last input: output and grad_input channels-last (the GEMMs and, in the input's type,
    the scatter write into them in place), equal to the reference."""
    skip_without_cpu_half_mm(dtype)
    case = (3, 5, 6, 7, 4, 3, 3, 1, 1, 1, 1, 5)
    x, off, w, b, s, p, d, m = make_inputs(case, dtype=torch.float64, offset_scale=1.0)
    args = [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in (x, off, w, b, s, p, d, m)]
    args[0] = args[0].contiguous(memory_format=torch.channels_last)
    out = E.deform_conv2d(args[0], args[2], args[1], args[7], args[3], *conv_args(args[0], args[2], s, p, d, 5))
    go = torch.randn(out.shape, dtype=torch.float64).to(dtype).contiguous(memory_format=torch.channels_last)
    gi = E.deform_conv2d_backward(
        go, args[0], args[2], args[1], args[7], args[3], *conv_args(args[0], args[2], s, p, d, 5)
    )[0]
    for t in (out, gi):
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    tol = 1e-10 if dtype == torch.float64 else 8e-2
    check_conv(args, atol=tol, rtol=tol)


def test_emulated_deform_conv_batch_zero_and_empty_output():
    for case in [(0, 4, 5, 5, 3, 3, 3, 1, 1, 1, 1, 1), (2, 0, 5, 5, 3, 3, 3, 1, 1, 1, 1, 1)]:
        x, off, w, b, s, p, d, m = make_inputs(case)
        if case[1] == 0:  # no input channels: the output is the bias
            w = torch.randn(3, 0, 3, 3, dtype=torch.float64)
            ref = b.view(1, 3, 1, 1).expand(2, 3, 5, 5)
        else:  # no images
            ref = torch.empty(0, 3, 5, 5, dtype=torch.float64)
        args = [(1, 1), (1, 1), (1, 1), 1, 1]
        out = E.deform_conv2d(x, w, off, m, b, *args)
        torch.testing.assert_close(out, ref)
        gi, gw, goff, gm, gb = E.deform_conv2d_backward(torch.ones_like(out), x, w, off, m, b, *args)
        assert gi.shape == x.shape and gw.shape == w.shape and goff.shape == off.shape
        assert not goff.abs().sum() and not gi.abs().sum()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_reduced_precision_weight_grad_accumulates_in_float(dtype):
    """Review defect 2: grad_weight summed chunk by chunk must not round each chunk's partial
    product to half/bfloat16. A 1x1 kernel on one channel, no offsets: grad_weight is
    sum_p grad_out[p] * x[p]. With 4-row chunks, even chunks sum to A + r and odd chunks to -A
    (A large, r below A's rounding step): accumulated in float the total is (chunks / 2) * r;
    rounding every chunk to the reduced type loses every r and gives 0."""
    skip_without_cpu_half_mm(dtype)
    A = 1024.0 if dtype == torch.float16 else 256.0
    r = 0.375 if dtype == torch.float16 else 0.75
    chunks, rows = 16, 4
    go = torch.zeros(1, 1, chunks * rows, 1, dtype=torch.float64)
    for c in range(chunks):
        go[0, 0, c * rows] = A if c % 2 == 0 else -A
        if c % 2 == 0:
            go[0, 0, c * rows + 1] = r
    x = torch.ones(1, 1, chunks * rows, 1, dtype=dtype)
    w = torch.ones(1, 1, 1, 1, dtype=dtype)
    off = torch.zeros(1, 2, chunks * rows, 1, dtype=dtype)
    with column_budget(2 * rows * x.element_size()):
        assert E.deform_conv2d_launch_plan(x, w, off, None, [1, 1], [0, 0], [1, 1], 1, 1)[2] == rows
        _, gw, _, _, _ = E.deform_conv2d_backward(go.to(dtype), x, w, off, None, None, [1, 1], [0, 0], [1, 1], 1, 1)
    assert gw.item() == pytest.approx(chunks / 2 * r, rel=1e-2), gw.item()


def test_emulated_nan_mask_off_the_map_gives_zero_everywhere():
    """Review defect 5: a sample that falls off the map contributes exactly zero and takes zero
    gradient, whatever its mask (NaN, inf): CUDA (emulated), the CPU kernel and the reference agree."""
    case = (1, 3, 5, 5, 2, 3, 3, 1, 1, 1, 1, 1)
    x, off, w, b, s, p, d, m = make_inputs(case)
    off = off.clone()
    m = m.clone()
    off[:, 0::2] = 0.0
    off[:, 1::2] = 0.0
    # tap 0 (dy, dx of channel 0/1) of every output pushed far off the map, with a NaN/inf mask
    off[:, 0] = -50.0
    m[:, 0] = float("nan")
    m[:, 0, 0, 0] = float("inf")
    results = {}
    for name, fn in (("emulated", emulated_conv), ("cpu", deform_conv2d), ("reference", deform_conv2d_reference)):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, off, w, b, m)]
        out = fn(leaves[0], leaves[1], leaves[2], leaves[3], s, p, d, leaves[4])
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], torch.ones_like(out))
        results[name] = (out, grads)
        assert torch.isfinite(out).all(), name
        for g in grads:
            assert torch.isfinite(g).all(), name
        assert not grads[4][:, 0].abs().sum() and not grads[1][:, 0:2].abs().sum(), name
    for name in ("emulated", "cpu"):
        torch.testing.assert_close(results[name][0], results["reference"][0], atol=1e-10, rtol=1e-10)
        for a, r in zip(results[name][1], results["reference"][1]):
            torch.testing.assert_close(a, r, atol=1e-10, rtol=1e-10)


def test_emulated_backward_workspace_is_bounded():
    """Review defect 4: the backward's two column buffers together stay within 256 MiB, even
    where the old 2048-row floor (C = 2048, 7x7 kernel: 0.8 GB a buffer) broke it."""
    meta = dict(device="meta", dtype=torch.float32)
    x = torch.empty(2, 2048, 64, 64, **meta)
    w = torch.empty(256, 2048, 7, 7, **meta)
    off = torch.empty(2, 2 * 49, 64, 64, **meta)
    plan = E.deform_conv2d_launch_plan(x, w, off, None, [1, 1], [3, 3], [1, 1], 1, 1)
    nb, fwd_rows, bwd_rows, fwd_bytes, bwd_bytes = plan[:5]
    assert fwd_bytes <= 256 << 20 and bwd_bytes <= 256 << 20, plan
    assert bwd_rows >= 1 and fwd_rows >= bwd_rows


@pytest.mark.parametrize(
    "dims",
    [
        (64, 2048, 200, 200, 512, 7, 7, 4),  # 5.2e9 input elements
        (1, 3, 60000, 60000, 64, 3, 3, 1),  # 1.1e10 input elements, 3.6e9 output positions
        (4096, 256, 128, 128, 256, 3, 3, 16),
    ],
)
def test_emulated_launch_sizes_within_cuda_limits_for_huge_tensors(dims):
    """Launch sizes as the driver computes them for tensors beyond 2^31 elements (meta tensors,
    nothing allocated): every grid inside CUDA's limits, whole warps per block."""
    N, C, H, W, Cout, kh, kw, dg = dims
    meta = dict(device="meta", dtype=torch.float16)
    x = torch.empty(N, C, H, W, **meta)
    w = torch.empty(Cout, C, kh, kw, **meta)
    off = torch.empty(N, 2 * dg * kh * kw, H, W, **meta)
    assert x.numel() > 2**31 or N * H * W * C * kh * kw > 2**31
    plan = E.deform_conv2d_launch_plan(x, w, off, None, [1, 1], [kh // 2, kw // 2], [1, 1], 1, dg)
    blocks, threads = plan[5:8], plan[8]
    assert threads % 32 == 0 and threads <= 1024
    assert all(1 <= b <= 2**31 - 1 for b in blocks), plan
    assert plan[4] <= 256 << 20, plan
    # RoI pooling: one thread per (bin, channel), one warp per bin, for 10^6 RoIs of 7x7 at C = 2048
    for items, per in ((10**6 * 49 * 2048, 1), (10**6 * 49, 32), (2**62, 1), (2**62, 32)):
        b, t = E.launch_config(items, per)
        assert 1 <= b <= 2**31 - 1 and t == threads


def test_emulated_zero_work_launches_nothing():
    assert E.launch_config(0, 1) == [0, 256] and E.launch_config(0, 32) == [0, 256]
    assert E.launch_config(1, 1) == [1, 256] and E.launch_config(9, 32) == [2, 256]
    with pytest.raises(RuntimeError, match="negative"):
        E.launch_config(-1, 1)


# --------------------------------------------------------------------------- deformable RoI pooling


def check_roi(x, rois, off, kw, atol, rtol, ref_dtype=torch.float64):
    ph, pw = _pair(kw["output_size"])
    args = (ph, pw, kw["spatial_scale"], kw["sampling_ratio"], kw["gamma"])
    out = E.deform_roi_pool(x, rois, off, *args)
    go = torch.randn(out.shape, dtype=torch.float64).to(out.dtype)
    gx, goff = E.deform_roi_pool_backward(go, x, rois, off, *args)
    rx = x.detach().to(ref_dtype).requires_grad_()
    roff = off.detach().to(ref_dtype).requires_grad_() if off is not None else None
    ref = deform_roi_pool_reference(rx, rois.to(ref_dtype), roff, **kw)
    torch.testing.assert_close(out.to(ref_dtype), ref.detach(), atol=atol, rtol=rtol)
    if ref.numel() == 0:
        return
    ins = [rx] + ([roff] if roff is not None else [])
    want = torch.autograd.grad(ref, ins, go.to(ref_dtype), allow_unused=True)
    torch.testing.assert_close(gx.to(ref_dtype), want[0], atol=atol, rtol=rtol, msg=lambda e: f"grad input: {e}")
    if off is not None:
        w = want[1] if want[1] is not None else torch.zeros_like(roff)
        torch.testing.assert_close(goff.to(ref_dtype), w, atol=atol, rtol=rtol, msg=lambda e: f"grad offset: {e}")


@pytest.mark.parametrize("output_size", [7, (3, 5), 1])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
@pytest.mark.parametrize("spatial_scale,gamma", [(0.25, 0.1), (1.0, 0.5)])
def test_emulated_deform_roi_pool_float64(output_size, sampling_ratio, spatial_scale, gamma):
    """Inside, across the border, wholly outside, zero-area and inverted RoIs, with and without offsets.
    40 channels: the warp per bin of the offset gradient loops over channels past its 32 lanes."""
    N, C, H, W = 2, 40, 9, 11
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    rois = make_rois(N, H, W, spatial_scale)
    ph, pw = _pair(output_size)
    kw = dict(output_size=output_size, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, gamma=gamma)
    for off in (torch.randn(rois.shape[0], 2, ph, pw, dtype=torch.float64) * 0.8, None):
        check_roi(x, rois, off, kw, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 2e-2), (torch.bfloat16, 1e-1)])
def test_emulated_deform_roi_pool_reduced_precision(dtype, tol):
    N, C, H, W = 2, 6, 10, 10
    x = torch.randn(N, C, H, W, dtype=torch.float64).to(dtype)
    rois = make_rois(N, H, W, 0.5, kind="inside").to(dtype)
    off = (torch.randn(rois.shape[0], 2, 3, 3, dtype=torch.float64) * 0.3).to(dtype)
    kw = dict(output_size=3, spatial_scale=0.5, sampling_ratio=2, gamma=0.1)
    check_roi(x, rois, off, kw, atol=tol * 4, rtol=tol)


@pytest.mark.parametrize("bad", [float("nan"), -0.5, -0.999, -1.0, 2.0, 7.5, float("inf")])
def test_emulated_roi_batch_index_out_of_range_pools_nothing(bad):
    """Review defect 1: on CUDA a NaN batch index, or one in (-1, 0), was truncated to image 0.
    Now every index outside [0, N) gives zero output and zero gradient there (the CPU raises)."""
    N, C, H, W = 2, 3, 8, 8
    x = torch.randn(N, C, H, W, dtype=torch.float64)
    rois = torch.tensor(
        [[0, 1.0, 1.0, 6.0, 6.0], [bad, 1.0, 1.0, 6.0, 6.0], [1, 0.0, 2.0, 5.0, 7.0]], dtype=torch.float64
    )
    off = torch.randn(3, 2, 2, 2, dtype=torch.float64) * 0.2
    args = (2, 2, 1.0, 2, 0.1)
    out = E.deform_roi_pool(x, rois, off, *args)
    assert not out[1].abs().sum()
    good = rois[[0, 2]]
    torch.testing.assert_close(out[[0, 2]], deform_roi_pool_reference(x, good, off[[0, 2]], 2, 1.0, 2, 0.1))
    go = torch.zeros_like(out)
    go[1] = 1.0
    gx, goff = E.deform_roi_pool_backward(go, x, rois, off, *args)
    assert not gx.abs().sum() and not goff.abs().sum()
    with pytest.raises(ValueError, match="batch index"):
        deform_roi_pool(x, rois, off, 2, 1.0, 2, 0.1)


def test_emulated_huge_roi_sample_grid_is_bounded():
    """Review defect 3: a 1e7 x 1e7 RoI with the adaptive grid took about 10^12 samples per bin.
    Now the grid is capped at MAX_ROI_SAMPLES per axis (kernels and reference alike), and an
    absurd explicit sampling_ratio is refused."""
    x = torch.randn(1, 2, 6, 6, dtype=torch.float64)
    rois = torch.tensor([[0, -5e6, -5e6, 5e6, 5e6], [0, 0.0, 0.0, 5.0, 5.0]], dtype=torch.float64)
    off = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    kw = dict(output_size=2, spatial_scale=1.0, sampling_ratio=0, gamma=0.1)
    check_roi(x, rois, off, kw, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(deform_roi_pool(x, rois, off, **kw), deform_roi_pool_reference(x, rois, off, **kw))
    for ratio in (MAX_ROI_SAMPLES + 1, 10**9):
        with pytest.raises(ValueError, match="sampling_ratio"):
            deform_roi_pool(x, rois, off, 2, 1.0, ratio)
        with pytest.raises(ValueError, match="sampling_ratio"):
            E.deform_roi_pool(x, rois, off, 2, 2, 1.0, ratio, 0.1)


def test_emulated_roi_pool_no_rois_and_empty_map():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    out = E.deform_roi_pool(x, torch.zeros(0, 5, dtype=torch.float64), None, 3, 3, 1.0, 0, 0.1)
    assert out.shape == (0, 3, 3, 3)
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    out = E.deform_roi_pool(torch.randn(1, 0, 5, 5, dtype=torch.float64), rois, None, 3, 3, 1.0, 0, 0.1)
    assert out.shape == (1, 0, 3, 3)


# --------------------------------------------------------------------------- the device layer itself


def test_emulated_every_cuda_kernel_goes_through_the_device_layer():
    """Kernels live in *_kernels.cuh over csrc/common/device.h, and the emulation compiles each of
    those headers: a kernel written straight into a .cu file (or launched with <<<...>>>) would not
    run under the emulation, so this test refuses it."""
    csrc = ROOT / "csrc"
    for path in sorted(csrc.rglob("*.cu")) + sorted(csrc.rglob("*.cuh")):
        text = path.read_text()
        assert "__global__" not in text and "<<<" not in text, f"{path}: use MMDCNV2_KERNEL and dev::launch"
        assert "__shfl" not in text and "atomicAdd" not in text, f"{path}: use dev::shfl_down / dev::atomic_add"
    emulated = (csrc / "emulated" / "emulated_ops.cpp").read_text()
    headers = sorted(csrc.rglob("*_kernels.cuh"))
    assert len(headers) >= 2
    for h in headers:
        assert h.relative_to(csrc).as_posix() in emulated, f"{h} is not compiled by the emulation"
    kernels = [k for h in headers for k in re.findall(r"MMDCNV2_KERNEL void (\w+)", h.read_text())]
    assert len(kernels) >= 6, kernels
    for h in headers:
        text = h.read_text()
        for k in re.findall(r"MMDCNV2_KERNEL void (\w+)", text):
            assert f"dev::launch(&{k}<" in text, f"{k} is not launched through dev::launch"


@pytest.mark.parametrize("threads,ok", [(256, True), (128, True), (48, False), (100, False)])
def test_emulated_threads_per_block_must_be_whole_warps(threads, ok, tmp_path):
    """Review defect 6: the warp-per-item kernels need kThreads % 32 == 0; it is a compile-time error."""
    torch_inc = pathlib.Path(torch.__file__).parent / "include"
    src = tmp_path / "probe.cpp"
    src.write_text(f'#define MMDCNV2_THREADS_PER_BLOCK {threads}\n#include "common/cuda_launch.h"\nint main() {{}}\n')
    std = "c++20" if "202002L" in (torch_inc / "ATen" / "ATen.h").read_text() else "c++17"  # as setup.py picks
    run = subprocess.run(
        ["c++", f"-std={std}", "-fsyntax-only", f"-I{ROOT / 'csrc'}", f"-I{torch_inc}", str(src)],
        capture_output=True,
        text=True,
    )
    assert (run.returncode == 0) == ok, run.stderr[-2000:]
    if not ok:
        assert "multiple of the warp size" in run.stderr
