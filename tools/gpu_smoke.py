"""Every op forward and backward on the GPU, small sizes: the script tools/gpu_check.sh runs under
compute-sanitizer (memcheck, racecheck). Also compares each CUDA result with the same kernels'
host emulation on the CPU (torch.ops.mmdcnv2_emulated), so that a run outside the sanitizer is a
correctness check of its own. Exits non-zero on any mismatch.

    python tools/gpu_smoke.py [--quick]
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mmdcnv2  # noqa: E402,F401
from mmdcnv2.ops import column_budget  # noqa: E402

E = torch.ops.mmdcnv2_emulated
M = torch.ops.mmdcnv2
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def close(name, a, b, tol):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    err = (a - b).abs().max().item() if a.numel() else 0.0
    scale = max(1.0, b.abs().max().item() if b.numel() else 1.0)
    ok = err <= tol * scale and a.shape == b.shape
    print(f"  {'ok ' if ok else 'BAD'} {name}: max |diff| {err:.3g} (scale {scale:.3g})")
    return ok


def conv_case(dtype, N=2, C=40, H=9, W=11, Cout=8, k=3, groups=2, dg=2, budget=0):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(Cout, C // groups, k, k, generator=g, dtype=torch.float64)
    off = torch.randn(N, 2 * dg * k * k, H, W, generator=g, dtype=torch.float64) * 2
    off.view(-1)[::97] = float("nan")
    m = torch.rand(N, dg * k * k, H, W, generator=g, dtype=torch.float64)
    b = torch.randn(Cout, generator=g, dtype=torch.float64)
    go = torch.randn(N, Cout, H, W, generator=g, dtype=torch.float64)
    args = [(1, 1), (1, 1), (1, 1), groups, dg]
    ok = True
    cpu = [t.to(dtype) for t in (x, w, off, m, b, go)]
    gpu = [t.cuda() for t in cpu]
    with column_budget(budget):
        out_cuda = M.deform_conv2d(gpu[0], gpu[1], gpu[2], gpu[3], gpu[4], *args)
        grads_cuda = M.deform_conv2d_backward(gpu[5], gpu[0], gpu[1], gpu[2], gpu[3], gpu[4], *args)
        torch.cuda.synchronize()
        out_emu = E.deform_conv2d(cpu[0], cpu[1], cpu[2], cpu[3], cpu[4], *args)
        grads_emu = E.deform_conv2d_backward(cpu[5], cpu[0], cpu[1], cpu[2], cpu[3], cpu[4], *args)
    tol = TOL[dtype]
    ok &= close(f"deform_conv2d {dtype} budget={budget} out vs emulated", out_cuda, out_emu, tol)
    for name, a, e in zip(["input", "weight", "offset", "mask", "bias"], grads_cuda, grads_emu):
        ok &= close(f"deform_conv2d {dtype} grad_{name} vs emulated", a, e, tol)
    return ok


def roi_case(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 12, 15, generator=g, dtype=torch.float64)
    rois = torch.tensor(
        [
            [0, 1, 2, 30, 40],
            [1, -10, -5, 20, 25],
            [1, 50, 50, 90, 80],
            [0, 5, 5, 5, 5],
            [float("nan"), 1, 1, 9, 9],
            [-0.5, 1, 1, 9, 9],
            [5, 1, 1, 9, 9],
        ],
        dtype=torch.float64,
    )
    off = torch.randn(rois.shape[0], 2, 7, 7, generator=g, dtype=torch.float64) * 0.5
    go = torch.randn(rois.shape[0], 40, 7, 7, generator=g, dtype=torch.float64)
    args = (7, 7, 0.25, 0, 0.1)
    ok = True
    cpu = [t.to(dtype) for t in (x, rois, off, go)]
    gpu = [t.cuda() for t in cpu]
    out_cuda = M.deform_roi_pool(gpu[0], gpu[1], gpu[2], *args)
    gx_cuda, goff_cuda = M.deform_roi_pool_backward(gpu[3], gpu[0], gpu[1], gpu[2], *args)
    torch.cuda.synchronize()
    out_emu = E.deform_roi_pool(cpu[0], cpu[1], cpu[2], *args)
    gx_emu, goff_emu = E.deform_roi_pool_backward(cpu[3], cpu[0], cpu[1], cpu[2], *args)
    tol = TOL[dtype]
    ok &= close(f"deform_roi_pool {dtype} out vs emulated", out_cuda, out_emu, tol)
    ok &= close(f"deform_roi_pool {dtype} grad_input vs emulated", gx_cuda, gx_emu, tol)
    ok &= close(f"deform_roi_pool {dtype} grad_offset vs emulated", goff_cuda, goff_emu, tol)
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="float32 only (for the slower sanitizer tools)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_smoke: no CUDA device")
    dtypes = [torch.float32] if a.quick else [torch.float64, torch.float32, torch.float16, torch.bfloat16]
    ok = True
    for dt in dtypes:
        ok &= conv_case(dt)
        ok &= conv_case(dt, budget=64 << 10)  # many chunks
        ok &= roi_case(dt)
    print("gpu_smoke:", "all CUDA results match the emulation" if ok else "MISMATCHES (above)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
