"""Where the GEMM time of one deformable layer goes on this CPU: each of the three products of a modulated
deformable 3x3 convolution (forward, grad_cols, grad_weight) as an MKL GEMM over row-major columns and as
oneDNN's convolution over the channels-last column image (the two CPU routes of mmdcnv2), interleaved,
with a dense 3x3 convolution of the same layer for scale. No mmdcnv2 op runs: these are the library calls
the routes make, on random data of the layer's shape.

    python tools/profile_gemms.py [--layer c3|c4|c5] [--batch 1] [--reps 5]

Prints the median and [min-max] in ms per product, and the machine (say which CPU: MKL's sgemm and
oneDNN's kernels differ by vendor).
"""

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

LAYERS = {"c3": (128, 100, 167), "c4": (256, 50, 84), "c5": (512, 25, 42)}  # ResNet-50 at 800x1333


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def time_once(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layer", choices=sorted(LAYERS), default="c3")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    if a.batch < 1 or a.reps < 1:
        p.error("--batch and --reps must be at least 1")
    torch.manual_seed(0)
    C, Ho, Wo = LAYERS[a.layer]
    Cout, kh, kw = C, 3, 3
    rows, KC = a.batch * Ho * Wo, kh * kw * C
    cols = torch.randn(rows, KC)  # row layout [rows, K * C]
    img = torch.randn(1, a.batch * kh * Ho, kw * Wo, C).permute(0, 3, 1, 2)  # the column image, channels-last
    w = torch.randn(Cout, C, kh, kw).contiguous(memory_format=torch.channels_last)
    w2 = torch.randn(Cout, KC)
    go = torch.randn(1, Cout, a.batch * Ho, Wo).contiguous(memory_format=torch.channels_last)
    go2 = go.permute(0, 2, 3, 1).reshape(rows, Cout)
    x = torch.randn(a.batch, C, Ho, Wo).contiguous(memory_format=torch.channels_last)
    conv_bwd = torch.ops.aten.convolution_backward
    fns = {
        "forward      MKL  cols @ W^T": lambda: torch.mm(cols, w2.t()),
        "forward      oneDNN conv": lambda: F.conv2d(img, w, stride=(kh, kw)),
        "grad_cols    MKL  grad_out @ W": lambda: torch.mm(go2, w2),
        "grad_cols    oneDNN backward-data": lambda: conv_bwd(
            go, img, w, None, [kh, kw], [0, 0], [1, 1], False, [0, 0], 1, [True, False, False]
        ),
        "grad_weight  MKL  grad_out^T @ cols": lambda: torch.mm(go2.t(), cols),
        "grad_weight  oneDNN backward-weight": lambda: conv_bwd(
            go, img, w, None, [kh, kw], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
        ),
        "dense 3x3 conv2d forward (scale)": lambda: F.conv2d(x, w, padding=1),
    }
    for fn in fns.values():  # warm-up
        fn()
    times = {k: [] for k in fns}
    for _ in range(a.reps):  # interleaved
        for k, fn in fns.items():
            times[k].append(time_once(fn))
    print(
        f"{a.layer} batch {a.batch} ({a.batch}x{C}x{Ho}x{Wo}, 3x3): {cpu_name()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d', time.gmtime())}"
    )
    for k, v in times.items():
        print(f"  {k:38s} {statistics.median(v):8.2f} ms  [{min(v):.2f}-{max(v):.2f}]")


if __name__ == "__main__":
    main()
