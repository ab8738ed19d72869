"""Benchmark suite: mmdcnv2's ops against torchvision, mmcv and dense convolution.

    python tools/benchmark.py [--device cpu|cuda] [--dtypes float32,float16,bfloat16] [--quick] [--out results/bench]

Times forward, backward and forward+backward (median of repeated runs after warm-up)
of the modulated deformable convolution at ResNet-50's c3/c4/c5 3x3 layers for an
800x1333 input, and reports peak memory per call; then deformable RoI pooling and
one Faster R-CNN R-50-FPN training iteration (DCNv2 in c3-c5: mmdcnv2 vs mmcv layers
vs the plain detector). Writes a markdown table and a PNG plot to --out.
"""

import argparse
import contextlib
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

from mmdcnv2.ops import cpu_route, deform_conv2d, deform_roi_pool  # noqa: E402

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


def once(fn, device):
    """Milliseconds of one call."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return 1000 * (time.perf_counter() - t)


def interleaved(fns, device, reps):
    """Times every function of the dict reps times, round-robin (a, b, c, a, b, c, ...), after one warm-up
    call each, so that drift on the machine hits all of them alike. Returns name -> list of ms."""
    for fn in fns.values():
        fn()
    sync(device)
    out = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            out[name].append(once(fn, device))
    return out


def stats(ms):
    """Median and spread (min, max) of a list of milliseconds."""
    return dict(median=statistics.median(ms), min=min(ms), max=max(ms), n=len(ms))


# ---------------------------------------------------------------- is the machine quiet?
def _cpu_jiffies():
    """(busy, total) jiffies of the whole machine from /proc/stat, or None."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v) - idle, sum(v)


def _own_cpu_seconds():
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class QuietWatch:
    """Measures how much CPU time other processes took while the benchmark ran (from /proc/stat minus this
    process's own CPU time), and a fixed calibration workload before and after. On the CPU it also samples the
    cores' multiply-add rate (`torch.ops.mmdcnv2.cpu_fma_peak`, all threads at once) before each layer: on a
    virtual machine another guest on the same physical cores can slow them for seconds, between two
    calibrations."""

    def __init__(self, device, rate_fn=None, handoff_fn=None):
        self.device = device
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        if rate_fn is None and device == "cpu" and torch.ops.mmdcnv2.cpu_tiled_info()[0]:
            rate_fn = lambda: torch.ops.mmdcnv2.cpu_fma_peak(0.1)  # noqa: E731
        if handoff_fn is None and device == "cpu" and torch.get_num_threads() > 1:
            handoff_fn = lambda: torch.ops.mmdcnv2.cpu_thread_handoff_ns(5)  # noqa: E731
        self.rate_fn = rate_fn  # GFLOP/s per thread now; None: not sampled (GPU, or no micro-kernel)
        # ns for a cache line to pass between the first two threads (-1 or None: not known); on a virtual machine the
        # host may place the virtual cores on one last-level cache or on two, and change that from time to time
        self.handoff_fn = handoff_fn
        self.sleep = time.sleep
        self.peaks = []  # (where in the run, GFLOP/s per thread)
        self.handoffs = []  # (where in the run, ns)
        self.slowed = []  # what was measured while the cores ran slow
        self.apart = []  # what was measured while the threads did not share a last-level cache
        self.last_before = None
        self.last_apart = False
        self.calib_before = self.calibrate()
        self.j0, self.c0, self.t0 = _cpu_jiffies(), _own_cpu_seconds(), time.perf_counter()

    def sample(self, label):
        """The multiply-add rate now (None where not sampled), noted with `label` (where in the run: "before ...",
        "after ...")."""
        if self.rate_fn is None:
            return None
        rate = self.rate_fn()
        self.peaks.append((label, rate))
        return rate

    def fast(self, rate):
        """Whether a rate is within 10% of the best seen so far in the run (None: nothing known, taken as fast)."""
        return rate is None or rate >= 0.9 * max(r for _, r in self.peaks)

    def handoff(self, label):
        """The threads' cache-line hand-off now (ns; None where not sampled or not measurable), noted with `label`."""
        if self.handoff_fn is None:
            return None
        ns = self.handoff_fn()
        if ns is None or ns < 0:
            return None
        self.handoffs.append((label, ns))
        return ns

    def apart_now(self, ns):
        """Whether a hand-off time says the threads do not share a last-level cache, where the run has seen them
        share one: more than twice the run's best and over 80 ns (one cache: 24-31 ns on this project's machines,
        two: about 170 ns). A run that never saw them share one marks nothing."""
        return ns is not None and ns > max(80.0, 2 * min(n for _, n in self.handoffs))

    def settle(self, label, max_wait_s=30.0):
        """Before a measurement: where the cores run more than 10% below the best rate seen, or the threads do not
        share a last-level cache where the run has seen them share one, waits (2 s at a time, at most max_wait_s) for
        that to pass, and says so. Returns the seconds waited."""
        waited = 0.0
        rate, ns = self.sample(f"before {label}"), self.handoff(f"before {label}")
        while (not self.fast(rate) or self.apart_now(ns)) and waited < max_wait_s:
            if waited == 0:
                print(
                    f"  (the cores run at {rate:.0f} GFLOP/s per thread, below the run's best: waiting)"
                    if not self.fast(rate)
                    else f"  (the threads pass a cache line in {ns:.0f} ns: not on one last-level cache now; waiting)",
                    flush=True,
                )
            self.sleep(2.0)
            waited += 2.0
            rate, ns = self.sample(f"before {label}"), self.handoff(f"before {label}")
        self.last_before = rate
        self.last_apart = self.apart_now(ns)
        return waited

    def done(self, label):
        """After a measurement: whether the cores ran slow around it (its sample before, or the one now, more than
        10% below the run's best); such measurements are named in the warning. Also notes (in `apart`) a measurement
        with the threads on two last-level caches before or after it."""
        rate = self.sample(f"after {label}")
        slowed = not self.fast(rate) or not self.fast(self.last_before)
        if slowed:
            self.slowed.append(label)
            print(f"  {label}: the cores ran slow around this measurement (see the warning)", flush=True)
        if self.apart_now(self.handoff(f"after {label}")) or self.last_apart:
            self.apart.append(label)
            print(f"  {label}: the threads were not on one last-level cache around this measurement", flush=True)
        return slowed

    def calibrate(self):
        """Median ms of a fixed workload: a 768^2 float32 GEMM and a 64 MiB copy."""
        a = torch.randn(768, 768, device=self.device)
        src = torch.empty(16 << 20, device=self.device)
        dst = torch.empty_like(src)
        return statistics.median(once(lambda: (a @ a, dst.copy_(src)), self.device) for _ in range(15))

    def finish(self):
        wall = time.perf_counter() - self.t0
        j1, c1 = _cpu_jiffies(), _own_cpu_seconds()
        self.sample("at the end")
        after = self.calibrate()
        report = dict(
            calibration_before_ms=self.calib_before,
            calibration_after_ms=after,
            calibration_change=after / self.calib_before - 1,
            wall_s=wall,
            warnings=[],
        )
        if self.j0 and j1:
            others = (j1[0] - self.j0[0]) / self.hz - (c1 - self.c0)
            report["other_cpu_fraction"] = max(0.0, others) / (wall * (os.cpu_count() or 1))
            if report["other_cpu_fraction"] > 0.05:
                report["warnings"].append(
                    f"other processes used {100 * report['other_cpu_fraction']:.0f}% of the machine's CPU time "
                    f"during the run: the figures are not those of a quiet machine"
                )
        try:
            report["loadavg"] = os.getloadavg()
        except OSError:
            pass
        if abs(report["calibration_change"]) > 0.15:
            report["warnings"].append(
                f"the calibration workload took {self.calib_before:.1f} ms before and {after:.1f} ms after the run "
                f"({100 * report['calibration_change']:+.0f}%): the machine's speed changed during the run"
            )

        def spread(samples):  # median, min and max of (label, value) samples
            values = [v for _, v in samples]
            return dict(median=statistics.median(values), min=min(values), max=max(values))

        if self.peaks:
            low = min(self.peaks, key=lambda p: p[1])
            rates = report["fma_peak"] = dict(spread(self.peaks), low=low[0])
            report["slowed"] = list(self.slowed)
            if self.slowed:
                report["warnings"].append(
                    f"the cores' multiply-add rate fell more than 10% below the run's best ({rates['max']:.0f} GFLOP/s "
                    f"per thread; lowest {rates['min']:.0f}, {low[0]}) around: {', '.join(self.slowed)}; "
                    "those figures are not those of a quiet machine"
                )
        if self.handoffs:
            ns = report["handoff_ns"] = spread(self.handoffs)
            report["apart"] = list(self.apart)
            if self.apart:
                report["warnings"].append(
                    f"the two threads did not share a last-level cache (a cache line took up to {ns['max']:.0f} ns to "
                    f"pass between them, {ns['min']:.0f} ns at best) around: {', '.join(self.apart)}; the host had "
                    "placed the virtual cores on two core complexes, which slows the backward's hand-offs between "
                    "threads"
                )
        for w in report["warnings"]:
            print(f"\n!!! WARNING: {w} !!!", flush=True)
        return report


# What torch's profiler (kineto, CUPTI) writes straight to the process's stderr on every start and stop on a
# machine without a GPU: noise for the reader of the benchmark, dropped; any other line is passed on.
PROFILER_NOISE = (
    "USDT",
    "profiler_start",
    "profiler_stop",
    "gpuGetDeviceCount",
    "CUPTI",
    "libkineto",
    "ActivityProfilerController",
    "kineto",
)


@contextlib.contextmanager
def profiler_quiet():
    """Holds back what C++ code writes to file descriptor 2 inside the block and re-emits the lines that
    are not the profiler's start/stop noise (Python's sys.stderr is flushed first, so nothing is lost)."""
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = [
                line
                for line in tmp.read().decode(errors="replace").splitlines()
                if line.strip() and not any(n in line for n in PROFILER_NOISE)
            ]
            for line in kept:
                print(line, file=sys.stderr)


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

    # our CPU route keeps its scratch in a pool between calls: emptied first, the call allocates it where the
    # profiler sees it (the footprint of a call, whether its scratch is new or the pool's)
    if hasattr(torch.ops.mmdcnv2, "release_cpu_scratch"):
        torch.ops.mmdcnv2.release_cpu_scratch()
    with profiler_quiet():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    # walk the allocation events in time order: running total, keep the peak
    events = sorted(
        (e for e in prof.events() if e.cpu_memory_usage != 0 and not e.cpu_children), key=lambda e: e.time_range.start
    )
    cur = peak = 0
    for e in events:
        cur += e.cpu_memory_usage
        peak = max(peak, cur)
    return peak


# Implementations that run inside a context, forward and backward alike (the CPU route is read
# when each op runs, so the backward must run inside it too).
CONTEXTS = {"mmdcnv2 GEMM route": lambda: cpu_route("gemm"), "mmdcnv2 conv route": lambda: cpu_route("conv")}


def conv_impls(device, dtype):
    impls = {"mmdcnv2": lambda x, o, w, b, s, m: deform_conv2d(x, o, w, b, s, 1, 1, m)}
    if device == "cpu" and dtype == torch.float32 and hasattr(torch.ops.mmdcnv2, "set_cpu_route"):
        # both routes forced (inside cpu_route, see CONTEXTS) beside "mmdcnv2", which is what auto picks
        impls["mmdcnv2 GEMM route"] = impls["mmdcnv2 conv route"] = impls["mmdcnv2"]
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


def bench_conv(device, dtype, reps, shapes, watch=None):
    rows = []
    impls = conv_impls(device, dtype)
    for name, (N, C, H, W), s, dg in shapes:
        label = f"{name} ({dtype})".replace("torch.", "")
        if watch is not None:
            watch.settle(label)
        Ho, Wo = (H + 2 - 3) // s + 1, (W + 2 - 3) // s + 1
        g = torch.Generator().manual_seed(0)
        mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
        x, w, b = mk(N, C, H, W), mk(C, C, 3, 3, scale=0.02), mk(C)
        off, m = mk(N, 2 * dg * 9, Ho, Wo, scale=2.0), torch.rand(N, dg * 9, Ho, Wo, generator=g).to(device, dtype)
        row = dict(shape=name, size=f"{N}x{C}x{H}x{W}", stride=s, dg=dg)
        fwd, fwd_bwd, mem = {}, {}, {}
        for impl, fn in impls.items():
            if impl == "mmcv" and dtype != torch.float32 and device == "cpu":
                continue
            leaves = [t.detach().requires_grad_() for t in (x, off, w, b, m)]
            xx, oo, ww, bb, mm = leaves
            ins = leaves if impl != "dense conv2d" else [xx, ww, bb]

            ctx = CONTEXTS.get(impl, contextlib.nullcontext)

            def f(fn=fn, ctx=ctx):
                with torch.no_grad(), ctx():
                    fn(x, off, w, b, s, m)

            def fb(fn=fn, ctx=ctx, xx=xx, oo=oo, ww=ww, bb=bb, mm=mm, ins=ins):
                with ctx():
                    out = fn(xx, oo, ww, bb, s, mm)
                    torch.autograd.grad(out, ins, torch.ones_like(out))

            try:
                fb()
                mem[impl] = peak_memory(fb, device)
            except Exception as e:  # a peer without a kernel for this device or dtype
                row[impl] = dict(error=str(e).splitlines()[0][:80])
                continue
            fwd[impl], fwd_bwd[impl] = f, fb
        t_f, t_fb = interleaved(fwd, device, reps), interleaved(fwd_bwd, device, reps)
        for impl in fwd:
            sf, sfb = stats(t_f[impl]), stats(t_fb[impl])
            row[impl] = dict(
                fwd=sf["median"],
                fwd_bwd=sfb["median"],
                bwd=sfb["median"] - sf["median"],
                fwd_spread=[sf["min"], sf["max"]],
                fwd_bwd_spread=[sfb["min"], sfb["max"]],
                mem_mib=mem[impl] / 2**20,
            )
            print(
                f"  {name:12s} {impl:18s} fwd {sf['median']:8.2f} ms [{sf['min']:.1f}-{sf['max']:.1f}]  "
                f"fwd+bwd {sfb['median']:8.2f} ms [{sfb['min']:.1f}-{sfb['max']:.1f}]  "
                f"peak {mem[impl] / 2**20:7.1f} MiB",
                flush=True,
            )
        if watch is not None:  # slow cores or threads on two last-level caches around the layer: its row is marked
            row["slowed"] = watch.done(label)
            row["apart"] = label in watch.apart
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
            f, rois, 7, 1 / 16, 2, aligned=True
        )
    except ImportError:
        pass
    row = dict(shape=f"2x256x50x84, {n} RoIs, 7x7")
    fwd, fwd_bwd = {}, {}
    for impl, fn in impls.items():
        ff, oo = feat.detach().requires_grad_(), off.detach().requires_grad_()
        ins = [ff, oo] if "roi_align" not in impl else [ff]

        def f(fn=fn):
            with torch.no_grad():
                fn(feat, off)

        def fb(fn=fn, ff=ff, oo=oo, ins=ins):
            out = fn(ff, oo)
            torch.autograd.grad(out, ins, torch.ones_like(out))

        try:
            fb()
        except Exception as e:
            row[impl] = dict(error=str(e).splitlines()[0][:80])
            print(f"  roi pool {impl}: {row[impl]['error']}")
            continue
        fwd[impl], fwd_bwd[impl] = f, fb
    t_f, t_fb = interleaved(fwd, device, reps), interleaved(fwd_bwd, device, reps)
    for impl in fwd:
        sf, sfb = stats(t_f[impl]), stats(t_fb[impl])
        row[impl] = dict(
            fwd=sf["median"],
            fwd_bwd=sfb["median"],
            bwd=sfb["median"] - sf["median"],
            fwd_bwd_spread=[sfb["min"], sfb["max"]],
        )
        print(
            f"  roi pool {impl:34s} fwd {sf['median']:8.2f} ms  fwd+bwd {sfb['median']:8.2f} ms "
            f"[{sfb['min']:.1f}-{sfb['max']:.1f}]",
            flush=True,
        )
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
        "DCNv2 c3-c5, mmdcnv2 layers": os.path.join(
            ROOT, "configs", "dcnv2", "faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py"
        ),
    }
    steps, losses, plain_state = {}, {}, None
    for name, path in variants.items():
        torch.manual_seed(0)
        model = MODELS.build(Config.fromfile(path).model).to(device)
        # Every variant gets the plain detector's weights: the deformable layers start as its plain 3x3
        # convolutions (offsets zero; our DCNv2 divides the weight by its 0.5 mask when it loads a plain
        # checkpoint, mmcv's gets weight x 2 here), so all compute the same function and see the same
        # proposals - the RoI head's cost follows the proposals' sizes and would otherwise differ by
        # hundreds of ms between randomly initialised models, drowning the backbone's difference.
        if plain_state is None:
            plain_state = model.state_dict()
        else:
            model.load_state_dict(plain_state, strict=False)  # conv_offset keeps its zero initialisation
            with torch.no_grad():
                for m in model.modules():
                    if type(m).__module__.startswith("mmcv.") and type(m).__name__ == "ModulatedDeformConv2dPack":
                        m.weight.mul_(2)
        model.train()
        # A full SGD step whose update is zero: every repetition sees the same weights, hence proposals.
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        packed = demo_mm_inputs(2, [[3, side, side]] * 2, num_items=[5, 5], num_classes=80, device=device)

        def step(model=model, opt=opt, packed=packed, name=name):
            torch.manual_seed(0)  # the same sampled RoIs in every repetition and variant
            data = model.data_preprocessor(packed, True)
            losses_ = model(**data, mode="loss")
            loss = sum(
                v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v)
                for k, v in losses_.items()
                if "loss" in k
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.setdefault(name, float(loss.detach()))

        steps[name] = step
    times = interleaved(steps, device, reps)
    print(
        "  detector losses of the first iteration (the same function in every variant): "
        + ", ".join(f"{k} {v:.5f}" for k, v in losses.items()),
        flush=True,
    )
    out = {}
    for name, ms in times.items():
        st = stats(ms)
        out[name] = st["median"]
        out[name + " spread"] = [st["min"], st["max"]]
        print(f"  detector {name:30s} {st['median']:9.1f} ms / iteration [{st['min']:.0f}-{st['max']:.0f}]", flush=True)
    return out, losses


def cpu_model():
    """The CPU's model name with its family and model numbers (a VM may name only the vendor's line, "AMD
    EPYC": family and model tell the generation); the platform's name where /proc/cpuinfo has none."""
    try:
        with open("/proc/cpuinfo") as f:
            info = [line.split(":", 1) for line in f if ":" in line]
    except OSError:
        return platform.processor() or "CPU"
    field = {k.strip(): v.strip() for k, v in reversed(info)}  # the first processor's values
    if "model name" not in field:
        return platform.processor() or "CPU"
    return f"{field['model name']} (family {field.get('cpu family', '?')}, model {field.get('model', '?')})"


def auto_route_name():
    """What `auto` takes for float32 on this CPU."""
    isa = torch.ops.mmdcnv2.cpu_tiled_info()[0] if hasattr(torch.ops.mmdcnv2, "cpu_tiled_info") else 0
    if isa:
        return f"the tiled route ({ {1: 'AVX2', 2: 'AVX-512'}[isa] } micro-kernels)"
    return "the convolution route up to 256 channels, the GEMM route above"


def fmt(v):
    return "-" if v is None else f"{v:.1f}"


def write_report(results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    lines = [
        f"# mmdcnv2 benchmark ({results['device_name']}, {results['date']})",
        "",
        f"torch {results['torch']}, {results['threads']} threads, {results['reps']} repeats interleaved across "
        f"implementations (median, [min-max] where shown)",
        "",
    ]
    q = results.get("quiet", {})
    for w in q.get("warnings", []):
        lines += [f"**WARNING: {w}.**", ""]
    if q:
        lines += [
            f"Calibration workload {q['calibration_before_ms']:.1f} ms before, {q['calibration_after_ms']:.1f} ms "
            f"after; other processes' share of the CPU during the run: "
            f"{100 * q.get('other_cpu_fraction', float('nan')):.1f}%."
            + (
                f" Multiply-add peak per thread, all threads at once, sampled before and after each layer: median "
                f"{q['fma_peak']['median']:.0f} GFLOP/s [{q['fma_peak']['min']:.0f}-{q['fma_peak']['max']:.0f}]; "
                "a layer marked (slowed) had a sample more than 10% below the run's best before or after it (before "
                "each layer the run waits up to 30 s for the cores to come back to speed)."
                if "fma_peak" in q
                else ""
            )
            + (
                f" Cache-line hand-off between the two threads, sampled before and after each layer: median "
                f"{q['handoff_ns']['median']:.0f} ns [{q['handoff_ns']['min']:.0f}-{q['handoff_ns']['max']:.0f}]; "
                "a layer marked (two L3) had the threads on two last-level caches before or after it (the host "
                "places the virtual cores; before each layer the run waits up to 30 s for one cache)."
                if "handoff_ns" in q
                else ""
            ),
            "",
        ]
    for dtype, rows in results["conv"].items():
        lines += [
            f"## Modulated deformable convolution, 3x3, {dtype} (ms)",
            "",
            "Ratios: ours / dense conv2d (fwd, fwd+bwd); ours / peer (fwd+bwd). "
            + (f"mmdcnv2 is `auto`, here {results['cpu_auto_route']}." if results.get("cpu_auto_route") else ""),
            "",
            "| layer | size | mmdcnv2 fwd | fwd+bwd [min-max] | GEMM route fwd / fwd+bwd | "
            "conv route fwd / fwd+bwd | peak MiB | dense fwd / fwd+bwd | vs dense | vs torchvision | vs mmcv |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            ours = r.get("mmdcnv2", {})
            if "fwd_bwd" not in ours:
                continue
            sp = ours.get("fwd_bwd_spread", [None, None])
            gemm = r.get("mmdcnv2 GEMM route", {})
            convr = r.get("mmdcnv2 conv route", {})
            d = r.get("dense conv2d", {})
            cells = [
                r["shape"] + (" (slowed)" if r.get("slowed") else "") + (" (two L3)" if r.get("apart") else ""),
                r["size"],
                fmt(ours.get("fwd")),
                f"{fmt(ours.get('fwd_bwd'))} [{fmt(sp[0])}-{fmt(sp[1])}]",
                f"{fmt(gemm.get('fwd'))} / {fmt(gemm.get('fwd_bwd'))}" if gemm else "-",
                f"{fmt(convr.get('fwd'))} / {fmt(convr.get('fwd_bwd'))}" if convr else "-",
                fmt(ours.get("mem_mib")),
                f"{fmt(d.get('fwd'))} / {fmt(d.get('fwd_bwd'))}",
                f"{ours['fwd'] / d['fwd']:.2f}x / {ours['fwd_bwd'] / d['fwd_bwd']:.2f}x" if "fwd" in d else "-",
            ]
            for peer in ("torchvision", "mmcv"):
                p = r.get(peer, {})
                cells.append(
                    f"{ours['fwd_bwd'] / p['fwd_bwd']:.3f}x ({p['fwd_bwd']:.0f} ms)" if "fwd_bwd" in p else "-"
                )
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("roi_pool"):
        lines += [
            "## Deformable RoI pooling (ms)",
            "",
            "| case | implementation | fwd | fwd+bwd |",
            "|---|---|---|---|",
        ]
        for r in results["roi_pool"]:
            for impl, v in r.items():
                if isinstance(v, dict):
                    lines.append(
                        f"| {r['shape']} | {impl} | {fmt(v.get('fwd'))} | "
                        f"{fmt(v.get('fwd_bwd')) if 'error' not in v else v['error']} |"
                    )
        lines.append("")
    if results.get("detector"):
        lines += [
            f"## One training iteration, Faster R-CNN R-50-FPN, 2 images {results['detector_side']}px (ms)",
            "",
            f"{results.get('detector_reps', results['reps'])} repetitions, interleaved; every variant with the plain "
            "detector's weights (the same function, the same proposals), loss of the first iteration: "
            + ", ".join(f"{k} {v:.5f}" for k, v in results.get("detector_losses", {}).items()),
            "",
            "| model | ms / iteration [min-max] | relative to plain |",
            "|---|---|---|",
        ]
        det = results["detector"]
        names = [k for k in det if not k.endswith(" spread")]
        lines += [
            f"| {k} | {det[k]:.0f} [{det[k + ' spread'][0]:.0f}-{det[k + ' spread'][1]:.0f}] | "
            f"{det[k] / det[names[0]]:.2f}x |"
            for k in names
        ]
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
            impls = [
                i
                for i in ("mmdcnv2", "torchvision", "mmcv", "dense conv2d")
                if any("fwd_bwd" in r.get(i, {}) for r in rows)
            ]
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
    p.add_argument(
        "--detector-reps",
        type=int,
        default=None,
        help="repetitions of the detector iteration (default 10 on the CPU, 20 on a GPU): one iteration "
        "varies by +-10%% on a 2-core machine",
    )
    p.add_argument("--out", default="results/bench")
    a = p.parse_args()
    for name in ("reps", "detector_reps"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(a, name)}")
    dtypes = (a.dtypes or ("float32" if a.device == "cpu" else "float32,float16,bfloat16")).split(",")
    reps = a.reps or (5 if a.device == "cpu" else 20)
    shapes = [s for s in SHAPES if s[0] in ("c4 b1", "small")] if a.quick else SHAPES
    dev_name = torch.cuda.get_device_name() if a.device == "cuda" else f"{cpu_model()}, {os.cpu_count()} cores"
    results = dict(
        device=a.device,
        device_name=dev_name,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        reps=reps,
        conv={},
        roi_pool=[],
        detector={},
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        cpu_auto_route=auto_route_name() if a.device == "cpu" else None,
    )
    watch = QuietWatch(a.device)
    for dt in dtypes:
        print(f"[conv {dt}]", flush=True)
        results["conv"][dt] = bench_conv(a.device, getattr(torch, dt), reps, shapes, watch)
    watch.settle("RoI pooling")
    print("[roi pool]", flush=True)
    results["roi_pool"] = bench_roi_pool(a.device, torch.float32, reps)
    watch.done("RoI pooling")
    if not a.no_detector:
        side = 320 if a.device == "cpu" else 800
        watch.settle("the detector")
        print(f"[detector, {side}px]", flush=True)
        dreps = a.detector_reps or (10 if a.device == "cpu" else 20)
        results["detector"], results["detector_losses"] = bench_detector(a.device, dreps, side)
        watch.done("the detector")
        results["detector_side"], results["detector_reps"] = side, dreps
    results["quiet"] = watch.finish()
    write_report(results, a.out)


if __name__ == "__main__":
    main()
