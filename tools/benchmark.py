"""Benchmark suite: mmdcnv2's ops against torchvision, mmcv and dense convolution.

    python tools/benchmark.py [--device cpu|cuda] [--dtypes float32,float16,bfloat16] [--quick] [--out results/bench]

Times forward, backward and forward+backward (median of repeated runs after warm-up)
of the modulated deformable convolution at ResNet-50's c3/c4/c5 3x3 layers for an
800x1333 input, and reports peak memory per call; then deformable RoI pooling and
one Faster R-CNN R-50-FPN training iteration (DCNv2 in c3-c5: mmdcnv2 vs mmcv layers
vs the plain detector). Writes a markdown table and a PNG plot to --out.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mmdcnv2.ops import deform_conv2d, deform_roi_pool  # noqa: E402

# name, (N, C, H, W), stride, deform groups
SHAPES = [
    ("c3 b1", (1, 128, 100, 167), 1, 1),
    ("c4 b1", (1, 256, 50, 84), 1, 1),
    ("c5 b1", (1, 512, 25, 42), 1, 1),
    ("c3 b2", (2, 128, 100, 167), 1, 1),
    ("c4 b2", (2, 256, 50, 84), 1, 1),
    ("c5 b2", (2, 512, 25, 42), 1, 1),
    ("c4 b1 dg4", (1, 256, 50, 84), 1, 4),
    ("c5 b1 dg4", (1, 512, 25, 42), 1, 4),
    ("c4 stride 2", (1, 256, 100, 167), 2, 1),
    ("small", (1, 64, 32, 32), 1, 1),
]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    fn()
    sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def peak_memory(fn, device):
    """Peak bytes allocated during one call beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # walk the allocation events in time order: running total, keep the peak
    events = sorted((e for e in prof.events() if e.cpu_memory_usage != 0 and not e.cpu_children),
                    key=lambda e: e.time_range.start)
    cur = peak = 0
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


def conv_impls(device):
    impls = {"mmdcnv2": lambda x, o, w, b, s, m: deform_conv2d(x, o, w, b, s, 1, 1, m)}
    try:
        import torchvision

        impls["torchvision"] = lambda x, o, w, b, s, m: torchvision.ops.deform_conv2d(x, o, w, b, s, 1, 1, m)
    except ImportError:
        pass
    try:
        from mmcv.ops import modulated_deform_conv2d

        def mmcv_fn(x, o, w, b, s, m, dg=1):
            return modulated_deform_conv2d(x, o, m, w, b, s, 1, 1, 1, o.shape[1] // 18)

        impls["mmcv"] = mmcv_fn
    except ImportError:
        pass
    impls["dense conv2d"] = lambda x, o, w, b, s, m: F.conv2d(x, w, b, s, 1)
    return impls


def bench_conv(device, dtype, reps, shapes):
    rows = []
    impls = conv_impls(device)
    for name, (N, C, H, W), s, dg in shapes:
        Ho, Wo = (H + 2 - 3) // s + 1, (W + 2 - 3) // s + 1
        g = torch.Generator().manual_seed(0)
        mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
        x, w, b = mk(N, C, H, W), mk(C, C, 3, 3, scale=0.02), mk(C)
        off, m = mk(N, 2 * dg * 9, Ho, Wo, scale=2.0), torch.rand(N, dg * 9, Ho, Wo, generator=g).to(device, dtype)
        row = dict(shape=name, size=f"{N}x{C}x{H}x{W}", stride=s, dg=dg)
        for impl, fn in impls.items():
            if impl == "mmcv" and dtype != torch.float32 and device == "cpu":
                continue
            leaves = [t.detach().requires_grad_() for t in (x, off, w, b, m)]
            xx, oo, ww, bb, mm = leaves
            try:
                with torch.no_grad():
                    t_f = timed(lambda: fn(x, off, w, b, s, m), device, reps)
                out = fn(xx, oo, ww, bb, s, mm)
                go = torch.randn_like(out)

                def fwd_bwd():
                    torch.autograd.grad(fn(xx, oo, ww, bb, s, mm), leaves if impl != "dense conv2d" else
                                        [xx, ww, bb], go)

                t_fb = timed(fwd_bwd, device, reps)
                mem = peak_memory(fwd_bwd, device)
            except Exception as e:  # a peer without a kernel for this device or dtype
                row[impl] = dict(error=str(e).splitlines()[0][:80])
                continue
            row[impl] = dict(fwd=t_f, bwd=t_fb - t_f, fwd_bwd=t_fb, mem_mib=mem / 2**20)
            print(f"  {name:12s} {impl:13s} fwd {t_f:8.2f} ms  fwd+bwd {t_fb:8.2f} ms  peak {mem / 2**20:7.1f} MiB",
                  flush=True)
        rows.append(row)
    return rows


def bench_roi_pool(device, dtype, reps):
    rows = []
    g = torch.Generator().manual_seed(0)
    feat = torch.randn(2, 256, 50, 84, generator=g).to(device, dtype)
    n = 512
    xy = torch.rand(n, 2, generator=g) * torch.tensor([1000.0, 600.0])
    wh = 32 + torch.rand(n, 2, generator=g) * 300
    rois = torch.cat([torch.randint(0, 2, (n, 1), generator=g).float(), xy, xy + wh], 1).to(device, dtype)
    off = (torch.randn(n, 2, 7, 7, generator=g) * 0.3).to(device, dtype)
    impls = {"mmdcnv2": lambda f, o: deform_roi_pool(f, rois, o, 7, 1 / 16, 2, 0.1)}
    try:
        from mmcv.ops import deform_roi_pool as mmcv_pool

        impls["mmcv"] = lambda f, o: mmcv_pool(f, rois, o, (7, 7), 1 / 16, 2, 0.1)
    except ImportError:
        pass
    try:
        import torchvision

        impls["torchvision roi_align (no offsets)"] = lambda f, o: torchvision.ops.roi_align(
            f, rois, 7, 1 / 16, 2, aligned=True)
    except ImportError:
        pass
    row = dict(shape=f"2x256x50x84, {n} RoIs, 7x7")
    for impl, fn in impls.items():
        ff, oo = feat.detach().requires_grad_(), off.detach().requires_grad_()
        try:
            with torch.no_grad():
                t_f = timed(lambda: fn(feat, off), device, reps)
            out = fn(ff, oo)
            go = torch.randn_like(out)
            ins = [ff, oo] if "roi_align" not in impl else [ff]
            t_fb = timed(lambda: torch.autograd.grad(fn(ff, oo), ins, go), device, reps)
        except Exception as e:
            row[impl] = dict(error=str(e).splitlines()[0][:80])
            print(f"  roi pool {impl}: {row[impl]['error']}")
            continue
        row[impl] = dict(fwd=t_f, bwd=t_fb - t_f, fwd_bwd=t_fb)
        print(f"  roi pool {impl:34s} fwd {t_f:8.2f} ms  fwd+bwd {t_fb:8.2f} ms", flush=True)
    rows.append(row)
    return rows


def bench_detector(device, reps, side):
    """One training iteration (forward, backward, SGD step) of Faster R-CNN R-50-FPN."""
    try:
        import mmdcnv2  # noqa: F401
        from mmdet.registry import MODELS
        from mmdet.testing import demo_mm_inputs
        from mmdet.utils import register_all_modules
        from mmengine.config import Config
    except ImportError as e:
        print("  detector: mmdet missing:", e)
        return {}
    register_all_modules()
    import mmdet

    base = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs")
    variants = {
        "plain (regular conv)": os.path.join(base, "faster_rcnn", "faster-rcnn_r50_fpn_1x_coco.py"),
        "DCNv2 c3-c5, mmcv layers": os.path.join(base, "dcnv2", "faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py"),
        "DCNv2 c3-c5, mmdcnv2 layers": os.path.join(ROOT, "configs", "dcnv2",
                                                    "faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py"),
    }
    out = {}
    for name, path in variants.items():
        torch.manual_seed(0)
        model = MODELS.build(Config.fromfile(path).model).to(device)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        packed = demo_mm_inputs(2, [[3, side, side]] * 2, num_items=[5, 5], num_classes=80, device=device)

        def step():
            data = model.data_preprocessor(packed, True)
            losses = model(**data, mode="loss")
            loss = sum(v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v)
                       for k, v in losses.items() if "loss" in k)
            opt.zero_grad()
            loss.backward()
            opt.step()

        out[name] = timed(step, device, reps)
        print(f"  detector {name:30s} {out[name]:9.1f} ms / iteration", flush=True)
    return out


def fmt(v):
    return "-" if v is None else f"{v:.1f}"


def write_report(results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    lines = [f"# mmdcnv2 benchmark ({results['device_name']})", "",
             f"torch {results['torch']}, {results['threads']} threads, repeats {results['reps']} (median)", ""]
    for dtype, rows in results["conv"].items():
        lines += [f"## Modulated deformable convolution, 3x3, {dtype} (ms; x = time relative to mmdcnv2)", "",
                  "| layer | size | mmdcnv2 fwd | fwd+bwd | peak MiB | torchvision fwd+bwd | mmcv fwd+bwd | dense conv2d fwd | dense fwd+bwd |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            ours = r.get("mmdcnv2", {})
            cells = [r["shape"], r["size"], fmt(ours.get("fwd")), fmt(ours.get("fwd_bwd")), fmt(ours.get("mem_mib"))]
            for peer in ("torchvision", "mmcv"):
                p = r.get(peer, {})
                if "fwd_bwd" in p and "fwd_bwd" in ours:
                    cells.append(f"{p['fwd_bwd']:.1f} ({p['fwd_bwd'] / ours['fwd_bwd']:.1f}x)")
                else:
                    cells.append("-")
            d = r.get("dense conv2d", {})
            cells += [fmt(d.get("fwd")), fmt(d.get("fwd_bwd"))]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("roi_pool"):
        lines += ["## Deformable RoI pooling (ms)", "", "| case | implementation | fwd | fwd+bwd |", "|---|---|---|---|"]
        for r in results["roi_pool"]:
            for impl, v in r.items():
                if isinstance(v, dict):
                    lines.append(f"| {r['shape']} | {impl} | {fmt(v.get('fwd'))} | "
                                 f"{fmt(v.get('fwd_bwd')) if 'error' not in v else v['error']} |")
        lines.append("")
    if results.get("detector"):
        lines += [f"## One training iteration, Faster R-CNN R-50-FPN, 2 images {results['detector_side']}px (ms)", "",
                  "| model | ms / iteration |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in results["detector"].items()]
    with open(os.path.join(out_dir, "benchmark.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "benchmark.json"), "w") as f:
        json.dump(results, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        dtypes = list(results["conv"])
        fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 4.5), squeeze=False)
        for ax, dtype in zip(axes[0], dtypes):
            rows = results["conv"][dtype]
            impls = [i for i in ("mmdcnv2", "torchvision", "mmcv", "dense conv2d") if any(
                "fwd_bwd" in r.get(i, {}) for r in rows)]
            width = 0.8 / len(impls)
            for k, impl in enumerate(impls):
                vals = [r.get(impl, {}).get("fwd_bwd", 0) for r in rows]
                ax.bar([i + k * width for i in range(len(rows))], vals, width, label=impl)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
            ax.set_xticklabels([r["shape"] for r in rows], rotation=35, ha="right")
            ax.set_yscale("log")
            ax.set_ylabel("forward + backward, ms (log)")
            ax.set_title(f"DCNv2 3x3, {dtype}, {results['device_name']}")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "benchmark.png"), dpi=110)
    except ImportError:
        pass
    print("\n".join(lines))
    print(f"\nwrote {out_dir}/benchmark.md, benchmark.json, benchmark.png")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None, help="default: float32 on the CPU; float32,float16,bfloat16 on a GPU")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="c4 and small shapes only, fewer repeats")
    p.add_argument("--no-detector", action="store_true")
    p.add_argument("--out", default="results/bench")
    a = p.parse_args()
    dtypes = (a.dtypes or ("float32" if a.device == "cpu" else "float32,float16,bfloat16")).split(",")
    reps = a.reps or (3 if a.device == "cpu" else 20)
    shapes = [s for s in SHAPES if s[0] in ("c4 b1", "small")] if a.quick else SHAPES
    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else f"{platform.processor() or 'CPU'} x{os.cpu_count()}"
    try:
        with open("/proc/cpuinfo") as f:
            model = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
        if a.device == "cpu" and model:
            dev_name = f"{model[0]}, {os.cpu_count()} cores"
    except OSError:
        pass
    results = dict(device=a.device, device_name=dev_name, torch=torch.__version__, threads=torch.get_num_threads(),
                   reps=reps, conv={}, roi_pool=[], detector={})
    for dt in dtypes:
        print(f"[conv {dt}]", flush=True)
        results["conv"][dt] = bench_conv(a.device, getattr(torch, dt), reps, shapes)
    print("[roi pool]", flush=True)
    results["roi_pool"] = bench_roi_pool(a.device, torch.float32, reps)
    if not a.no_detector:
        side = 320 if a.device == "cpu" else 800
        print(f"[detector, {side}px]", flush=True)
        results["detector"] = bench_detector(a.device, reps, side)
        results["detector_side"] = side
    write_report(results, a.out)


if __name__ == "__main__":
    main()
