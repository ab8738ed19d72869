"""A short demonstration of mmdcnv2's ops that prints figures a user can check.

1. A DCNv2 layer at initialisation (zero offsets, mask 0.5) equals half a plain conv2d.
2. With random offsets and masks, the compiled op equals the pure-PyTorch reference.
3. Deformable RoI pooling with zero offsets equals torchvision's roi_align(aligned=True).
4. Timing of one DCNv2 layer (ResNet-50 c4 shape) against torchvision and dense conv2d.
"""

import time

import torch
import torch.nn.functional as F

import mmdcnv2
from mmdcnv2.ops import (
    ModulatedDeformConv2dPack,
    deform_conv2d,
    deform_conv2d_reference,
    deform_roi_pool,
    has_cuda_kernels,
)


def median_ms(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * sorted(times)[len(times) // 2]


def main():
    torch.manual_seed(0)
    print(
        f"mmdcnv2 {mmdcnv2.__version__} on torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"CUDA kernels built: {has_cuda_kernels()}"
    )

    layer = ModulatedDeformConv2dPack(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 40, 40)
    err = (layer(x) - (0.5 * F.conv2d(x, layer.weight, None, 1, 1) + layer.bias.view(1, -1, 1, 1))).abs().max()
    print(f"[1] DCNv2 at initialisation vs 0.5 * conv2d + bias: max |diff| = {err:.2e}")

    x64 = torch.randn(2, 16, 20, 24, dtype=torch.float64)
    off = torch.randn(2, 2 * 2 * 9, 20, 24, dtype=torch.float64) * 2
    mask = torch.rand(2, 2 * 9, 20, 24, dtype=torch.float64)
    w = torch.randn(8, 16, 3, 3, dtype=torch.float64)
    err = deform_conv2d(x64, off, w, None, 1, 1, 1, mask) - deform_conv2d_reference(x64, off, w, None, 1, 1, 1, mask)
    print(f"[2] compiled op vs pure-PyTorch reference (float64, 2 deform groups): max |diff| = {err.abs().max():.2e}")

    try:
        import torchvision

        feat = torch.randn(1, 8, 32, 32)
        rois = torch.tensor([[0, 10.0, 12.0, 90.0, 100.0], [0, 40.0, 5.0, 70.0, 60.0]])
        ours = deform_roi_pool(feat, rois, None, 7, 0.25, 2)
        ref = torchvision.ops.roi_align(feat, rois, 7, 0.25, 2, aligned=True)
        print(
            f"[3] deform_roi_pool with zero offsets vs torchvision roi_align: max |diff| = {(ours - ref).abs().max():.2e}"
        )
    except ImportError:
        torchvision = None
        print("[3] torchvision is not installed: skipped")

    N, C, H, W = 1, 256, 50, 84
    x = torch.randn(N, C, H, W)
    w = torch.randn(C, C, 3, 3) * 0.02
    off = torch.randn(N, 18, H, W)
    mask = torch.rand(N, 9, H, W)
    with torch.no_grad():
        t_ours = median_ms(lambda: deform_conv2d(x, off, w, None, 1, 1, 1, mask))
        t_dense = median_ms(lambda: F.conv2d(x, w, None, 1, 1))
        line = f"[4] forward, {N}x{C}x{H}x{W}, 3x3: mmdcnv2 {t_ours:.1f} ms, dense conv2d {t_dense:.1f} ms"
        if torchvision is not None:
            t_tv = median_ms(lambda: torchvision.ops.deform_conv2d(x, off, w, None, 1, 1, 1, mask), reps=3)
            line += f", torchvision {t_tv:.1f} ms ({t_tv / t_ours:.1f}x slower than mmdcnv2)"
    print(line)


if __name__ == "__main__":
    main()
