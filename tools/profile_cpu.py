"""Where the time of the CPU's tiled route goes, per layer shape: the phase timers of the kernels
(`torch.ops.mmdcnv2.set_cpu_profile`), over a few forward and forward+backward calls, beside the wall time
and a dense 3x3 convolution of the same shape. Run it on a quiet machine.

    python tools/profile_cpu.py [--shapes c3,c4,c5,c3b2,c4dg4,c5dg4,s2,small] [--reps 5]

For each shape it prints the median wall time of the forward and of the backward alone (ms), the dense
convolution's, and how the thread time of each splits into phases (% of all thread time of that pass):

- forward: sampling (the columns of one tap for a tile of rows, in cache), products (our micro-kernels),
  output writes (with the bias, into the caller's layout);
- backward: grad_cols products (with the gather of grad_out's rows), the sampling pass (columns, offset
  and mask gradients), grad_weight products, the scatter into grad_input;
- both, outside their parallel loops: the weight's packing into panels, the layout copies (the input to
  channels-last; in the backward also grad_input into the result's planes or pixels), the weight gradient
  into the weight's layout (backward), and the rest of the setup (allocation, zeroing).

It then gives each product's rate (GFLOP/s per thread) and the dense forward's, as shares of the peak of the
micro-kernels' multiply-adds (`torch.ops.mmdcnv2.cpu_fma_peak`: from registers alone, all threads at once, measured
before and after each shape): how far the products are from what the cores can do at all. The peak is watched as
tools/benchmark.py watches it (its QuietWatch): before each shape the tool waits, up to 30 s, while the cores run more
than 10% below the best rate seen (on a virtual machine, another guest on the same physical cores can halve them for
seconds at a time); a shape with a low sample before or after it is named in a warning at the end.

Thread time is summed over the threads (a phase timed from outside a parallel loop counts its wall time
times the thread count). It also says which CPU this is: figures differ by vendor.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from benchmark import QuietWatch, cpu_model  # noqa: E402
from mmdcnv2.ops import cpu_route, deform_conv2d  # noqa: E402

# name: (N, C, H, W, stride, deform groups); ResNet-50's 3x3 layers at 800x1333, as tools/benchmark.py
SHAPES = {
    "c3": (1, 128, 100, 167, 1, 1),
    "c4": (1, 256, 50, 84, 1, 1),
    "c5": (1, 512, 25, 42, 1, 1),
    "c3b2": (2, 128, 100, 167, 1, 1),
    "c4b2": (2, 256, 50, 84, 1, 1),
    "c5b2": (2, 512, 25, 42, 1, 1),
    "c4dg4": (1, 256, 50, 84, 1, 4),
    "c5dg4": (1, 512, 25, 42, 1, 4),
    "s2": (1, 256, 100, 167, 2, 1),
    "small": (1, 64, 32, 32, 1, 1),
}
FWD = ["sampling", "products", "output writes"]
BWD = ["grad_cols products", "sampling pass", "grad_weight products", "scatter"]
# the order of the kernel's counters (csrc/deform_conv/cpu/deform_conv_kernel.cpp, enum Phase)
COUNTERS = FWD + BWD + ["setup", "packing", "layout copies", "grad_weight layout"]
# what each pass prints: its own phases, then those outside its parallel loops
PASS_KEYS = {
    "fwd": FWD + ["packing", "layout copies", "setup"],
    "bwd": BWD + ["packing", "layout copies", "grad_weight layout", "setup"],
}


def phases(fn):
    """(wall ms, {phase: thread ms}) of one call."""
    torch.ops.mmdcnv2.set_cpu_profile(True)
    t0 = time.perf_counter()
    fn()
    wall = (time.perf_counter() - t0) * 1e3
    torch.ops.mmdcnv2.set_cpu_profile(False)
    ns = torch.ops.mmdcnv2.cpu_profile()
    return wall, {name: ns[i] / 1e6 for i, name in enumerate(COUNTERS)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="c3,c4,c5,c3b2,c4dg4,c5dg4,s2,small")
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    if a.reps < 1:
        p.error("--reps must be at least 1")
    names = [s for s in a.shapes.split(",") if s]
    unknown = [s for s in names if s not in SHAPES]
    if unknown:
        p.error(f"unknown shapes {unknown}; choose from {', '.join(SHAPES)}")
    info = torch.ops.mmdcnv2.cpu_tiled_info()
    if not info[0]:
        sys.exit("the tiled route needs AVX2+FMA or AVX-512; this CPU has neither")
    isa = {1: "AVX2", 2: "AVX-512"}[info[0]]
    print(
        f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{isa} micro-kernels, {time.strftime('%Y-%m-%d')}",
        flush=True,
    )
    watch = QuietWatch("cpu")
    for name in names:
        N, C, H, W, s, dg = SHAPES[name]
        Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
        g = torch.Generator().manual_seed(0)
        x, w, b = torch.randn(N, C, H, W, generator=g), torch.randn(C, C, 3, 3, generator=g) * 0.02, torch.randn(C)
        off = torch.randn(N, 2 * dg * 9, Ho, Wo, generator=g) * 2
        m = torch.rand(N, dg * 9, Ho, Wo, generator=g)
        leaves = [t.clone().requires_grad_() for t in (x, off, w, b, m)]
        go = torch.ones(N, C, Ho, Wo)

        def fwd():
            with torch.no_grad():
                deform_conv2d(x, off, w, b, s, 1, 1, m)

        def bwd():
            out = deform_conv2d(leaves[0], leaves[1], leaves[2], leaves[3], s, 1, 1, leaves[4])
            torch.ops.mmdcnv2.set_cpu_profile(True)  # the backward alone
            t0 = time.perf_counter()
            torch.autograd.grad(out, leaves, go)
            return (time.perf_counter() - t0) * 1e3

        def dense():
            with torch.no_grad():
                F.conv2d(x, w, b, s, 1)

        watch.settle(name)
        peak_before = watch.last_before
        with cpu_route("tiled"):
            fwd(), bwd(), dense()  # the first call of a shape measures its tile sizes
            rows = {"fwd": [], "bwd": [], "dense": []}
            parts = {"fwd": {}, "bwd": {}}
            for _ in range(a.reps):
                wall, ph = phases(fwd)
                rows["fwd"].append(wall)
                for k, v in ph.items():
                    parts["fwd"].setdefault(k, []).append(v)
                wall = bwd()
                torch.ops.mmdcnv2.set_cpu_profile(False)
                ns = torch.ops.mmdcnv2.cpu_profile()
                rows["bwd"].append(wall)
                for i, k in enumerate(COUNTERS):
                    parts["bwd"].setdefault(k, []).append(ns[i] / 1e6)
                t0 = time.perf_counter()
                dense()
                rows["dense"].append((time.perf_counter() - t0) * 1e3)
        med = {k: statistics.median(v) for k, v in rows.items()}
        print(
            f"\n{name} ({N}x{C}x{H}x{W}, stride {s}, {dg} deform group(s)): forward {med['fwd']:.1f} ms, "
            f"backward {med['bwd']:.1f} ms, dense forward {med['dense']:.1f} ms",
            flush=True,
        )
        for pas, keys in PASS_KEYS.items():
            tot = {k: statistics.median(v) for k, v in parts[pas].items()}
            total = sum(tot[k] for k in keys) or 1.0
            cells = ", ".join(f"{k} {100 * tot[k] / total:.0f}%" for k in keys)
            print(f"  {'forward' if pas == 'fwd' else 'backward'} thread time {total:.1f} ms: {cells}", flush=True)
        # each product (and the dense forward) is 2 * rows * Cout * 9 * C floating-point operations
        flop = 2 * N * Ho * Wo * C * 9 * C
        rates = {
            k: flop / (statistics.median(parts[pas][k]) * 1e6)
            for pas, k in (("fwd", "products"), ("bwd", "grad_cols products"), ("bwd", "grad_weight products"))
        }
        dense_rate = flop / (med["dense"] * torch.get_num_threads() * 1e6)
        watch.done(name)
        peak_after = watch.peaks[-1][1]
        peak = (peak_before + peak_after) / 2
        cells = ", ".join(f"{k} {r:.0f} ({100 * r / peak:.0f}%)" for k, r in rates.items())
        print(
            f"  GFLOP/s per thread (% of the {isa} multiply-add peak, {peak_before:.0f} before and {peak_after:.0f} "
            f"after): {cells}; dense forward {dense_rate:.0f} ({100 * dense_rate / peak:.0f}%)",
            flush=True,
        )
    watch.finish()


if __name__ == "__main__":
    main()
