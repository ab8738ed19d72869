"""Malformed calls end in a Python exception that names the argument, never in a crash; memory does
not grow over repeated calls.

The malformed calls run in a child process (this file run as a script), one after the other, each
announced before it runs: a crash (segfault, abort) kills only the child, and the parent reports
which call it was on. Huge sizes use expanded tensors (no memory behind them) or meta tensors, and
must be refused before anything is allocated.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from mmdcnv2.ops._library import FAKE_KERNELS_NEED, HAS_FAKE_KERNELS

HERE = os.path.abspath(__file__)
GOOD_ERRORS = ("ValueError", "RuntimeError", "TypeError")


def _conv_cases():
    """(name, expected argument in the message or None for a call that must succeed, call)."""
    from mmdcnv2.ops import deform_conv2d

    op = torch.ops.mmdcnv2
    x, off, w = torch.randn(1, 4, 6, 6), torch.randn(1, 18, 6, 6), torch.randn(4, 4, 3, 3)
    m, b = torch.rand(1, 9, 6, 6), torch.randn(4)
    huge = torch.empty(1).expand(1, 1, 2**16, 2**16)  # 2^32 elements, nothing allocated

    def f(**kw):
        args = dict(input=x, offset=off, weight=w, bias=b, stride=1, padding=1, dilation=1, mask=m)
        args.update(kw)
        return lambda: deform_conv2d(**args)

    def raw(
        *,
        input=x,
        weight=w,
        offset=off,
        mask=m,
        bias=b,
        stride=(1, 1),
        padding=(1, 1),
        dilation=(1, 1),
        groups=1,
        deform_groups=1,
    ):
        return lambda: op.deform_conv2d(
            input, weight, offset, mask, bias, list(stride), list(padding), list(dilation), groups, deform_groups
        )

    meta = lambda t: t.to("meta")  # noqa: E731
    cases = [
        ("valid", None, f()),
        ("valid batch 0", None, f(input=x[:0], offset=off[:0], mask=m[:0])),
        ("valid no output channels", None, f(weight=w[:0], bias=b[:0])),
        ("input 3-D", "input", f(input=x[0])),
        ("input 5-D", "input", f(input=x[None])),
        ("offset 3-D", "offset", f(offset=off[0])),
        ("weight 2-D", "weight", f(weight=w[:, :, 0, 0])),
        ("input not a tensor", "input", f(input=x.tolist())),
        ("offset None", "offset", f(offset=None)),
        ("offset channels", "offset", f(offset=off[:, :17])),
        ("offset spatial", "offset", f(offset=off[:, :, :5])),
        ("offset batch", "offset", f(offset=off.expand(2, -1, -1, -1))),
        ("mask shape", "mask", f(mask=m[:, :8])),
        ("bias shape", "bias", f(bias=torch.randn(5))),
        ("weight channels", "weight", f(weight=torch.randn(4, 3, 3, 3))),
        ("weight output channels vs groups", "weight", f(weight=torch.randn(3, 2, 3, 3), bias=None)),
        (
            "input channels vs deform groups",
            "deform_groups",
            f(
                input=torch.randn(1, 3, 6, 6),
                weight=torch.randn(3, 3, 3, 3),
                bias=None,
                offset=torch.randn(1, 36, 6, 6),
                mask=torch.rand(1, 18, 6, 6),
            ),
        ),
        ("empty channels", "weight", f(input=x[:, :0], weight=w[:, :0])),
        ("empty map", "input", f(input=x[:, :, :0], padding=0)),
        ("integer tensors", "input", f(input=x.long(), offset=off.long(), weight=w.long(), mask=None, bias=None)),
        ("offset dtype", "offset", f(offset=off.double())),
        ("mask dtype", "mask", f(mask=m.half())),
        ("offset on meta", "offset", f(offset=meta(off))),
        ("mask on meta", "mask", f(mask=meta(m))),
        ("input on meta", "weight", f(input=meta(x))),
        ("stride 0", "stride", f(stride=0)),
        ("stride 3 values", "stride", f(stride=(1, 1, 1))),
        ("padding negative", "padding", f(padding=-1)),
        ("dilation 0", "dilation", f(dilation=0)),
        ("stride float", "stride", f(stride=1.5)),
        (
            "huge input, wrong offset",
            "offset",
            f(input=huge, weight=w[:1, :1], offset=off[:, :, :2], mask=None, bias=None),
        ),
        ("huge kernel", "offset", f(weight=torch.empty(1).expand(4, 4, 2**40, 3), padding=0, mask=None)),
        ("huge padding", "offset", f(padding=2**62)),
        # the compiled op's own checks (what torch.ops.mmdcnv2 callers hit)
        ("raw offset channels", "offset", raw(offset=off[:, :17])),
        ("raw mask shape", "mask", raw(mask=m[:, :8])),
        ("raw bias shape", "bias", raw(bias=torch.randn(5))),
        ("raw offset on meta", "offset", raw(offset=meta(off))),
        ("raw input on meta", "input", raw(input=meta(x))),
        (
            "raw all meta, wrong offset",
            "offset",
            raw(input=meta(x), weight=meta(w), offset=meta(off[:, :4]), mask=None, bias=None),
        ),
        ("raw padding 2^62", "padding", raw(padding=(2**62, 1))),
        ("raw dilation 2^62", "dilation", raw(dilation=(2**62, 1))),
        ("raw stride 2^62", "stride", raw(stride=(2**62, 1))),
        ("raw groups 2^62", "groups", raw(groups=2**62)),
        ("raw deform_groups 0", "deform_groups", raw(deform_groups=0)),
        (
            "raw dilated kernel overflow",
            "dilation",
            raw(weight=torch.empty(1).expand(4, 4, 2**40, 3), dilation=(2**31 - 1, 1), mask=None),
        ),
        ("raw integer input", "input", raw(input=x.long(), weight=w.long(), offset=off.long(), mask=None, bias=None)),
        (
            "raw backward grad_output",
            "grad_output",
            lambda: op.deform_conv2d_backward(torch.randn(1, 4, 5, 6), x, w, off, m, b, [1, 1], [1, 1], [1, 1], 1, 1),
        ),
    ]
    return cases


def _pool_cases():
    from mmdcnv2.ops import deform_roi_pool

    op = torch.ops.mmdcnv2
    feat, rois, off = (
        torch.randn(2, 4, 8, 8),
        torch.tensor([[0, 1.0, 1, 6, 6], [1, 2, 0, 7, 5]]),
        torch.randn(2, 2, 3, 3),
    )

    def f(**kw):
        args = dict(input=feat, rois=rois, offset=off, output_size=3, spatial_scale=1.0, sampling_ratio=2, gamma=0.1)
        args.update(kw)
        return lambda: deform_roi_pool(**args)

    def raw(*, input=feat, rois=rois, offset=off, ph=3, pw=3, scale=1.0, ratio=2, gamma=0.1):
        return lambda: op.deform_roi_pool(input, rois, offset, ph, pw, scale, ratio, gamma)

    meta = lambda t: t.to("meta")  # noqa: E731
    return [
        ("pool valid", None, f()),
        ("pool no RoIs", None, f(rois=rois[:0], offset=off[:0])),
        ("pool empty map", None, f(input=feat[:, :, :0])),
        ("pool NaN RoI", None, f(rois=torch.tensor([[0, float("nan"), 1, 6, 6], [1, 2, 0, 7, float("inf")]]))),
        ("pool input 3-D", "input", f(input=feat[0])),
        ("pool input not a tensor", "input", f(input=None)),
        ("pool rois (K, 4)", "rois", f(rois=rois[:, :4])),
        ("pool rois 1-D", "rois", f(rois=rois[0], offset=None)),
        ("pool offset shape", "offset", f(offset=off[:, :1])),
        ("pool offset count", "offset", f(offset=off[:1])),
        ("pool rois dtype", "rois", f(rois=rois.double())),
        ("pool offset dtype", "offset", f(offset=off.double())),
        ("pool integer input", "input", f(input=feat.long(), rois=rois.long(), offset=None)),
        ("pool batch index", "rois", f(rois=torch.tensor([[2, 1.0, 1, 6, 6], [0, 2, 0, 7, 5]]))),
        ("pool batch index NaN", "rois", f(rois=torch.tensor([[float("nan"), 1.0, 1, 6, 6], [0, 2, 0, 7, 5]]))),
        ("pool output_size 0", "output_size", f(output_size=0, offset=None)),
        ("pool sampling_ratio", "sampling_ratio", f(sampling_ratio=-1)),
        ("pool spatial_scale 0", "spatial_scale", f(spatial_scale=0.0)),
        ("pool spatial_scale NaN", "spatial_scale", f(spatial_scale=float("nan"))),
        ("pool gamma inf", "gamma", f(gamma=float("inf"))),
        ("pool offset on meta", "offset", f(offset=meta(off))),
        ("pool rois on meta", "rois", f(rois=meta(rois))),
        ("pool huge output", "output_size", f(output_size=2**40, offset=None)),
        (
            "pool huge input, wrong rois",
            "rois",
            f(input=torch.empty(1).expand(1, 2**12, 2**12, 2**12), rois=rois[:, :4], offset=None),
        ),
        ("raw pool rois on meta", "rois", raw(rois=meta(rois))),
        ("raw pool offset on meta", "offset", raw(offset=meta(off))),
        ("raw pool huge output", "output_size", raw(ph=2**31, pw=2**31, offset=None)),
        ("raw pool all meta, wrong offset", "offset", raw(input=meta(feat), rois=meta(rois), offset=meta(off[:1]))),
        (
            "raw pool backward grad_output",
            "grad_output",
            lambda: op.deform_roi_pool_backward(torch.randn(3, 4, 3, 3), feat, rois, off, 3, 3, 1.0, 2, 0.1),
        ),
    ]


def _run_cases():
    """Child process: run every case, one JSON line each (announced first, so a crash points at it)."""
    import mmdcnv2  # noqa: F401

    for name, arg, call in _conv_cases() + _pool_cases():
        print(json.dumps({"start": name}), flush=True)
        try:
            out = call()
            result = {"name": name, "arg": arg, "ok": True, "shape": list(out.shape)}
        except Exception as e:  # noqa: BLE001  (reported to the parent)
            result = {"name": name, "arg": arg, "ok": False, "type": type(e).__name__, "message": str(e)[:400]}
        print(json.dumps(result), flush=True)


def test_malformed_calls_raise_clear_errors_and_never_crash():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, HERE, "--cases"], capture_output=True, text=True, env=env, timeout=300)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    started = [r["start"] for r in lines if "start" in r]
    results = [r for r in lines if "name" in r]
    assert proc.returncode == 0, (
        f"the child died (return code {proc.returncode}) during {started[-1] if started else '?'!r}:\n"
        f"{proc.stderr[-3000:]}"
    )
    assert len(results) == len(started) > 40
    bad = []
    for r in results:
        if not HAS_FAKE_KERNELS and "meta" in r["name"] and f"needs torch >= {FAKE_KERNELS_NEED}" in r["message"]:
            continue  # no fake kernels: what reaches the op on meta tensors is refused, naming the torch needed
        if r["arg"] is None:
            if not r["ok"]:
                bad.append(f"{r['name']}: must succeed, raised {r['type']}: {r['message']}")
        elif r["ok"]:
            bad.append(f"{r['name']}: returned a tensor of shape {r['shape']} instead of raising")
        elif r["type"] not in GOOD_ERRORS or r["arg"] not in r["message"]:
            bad.append(f"{r['name']}: {r['type']}: {r['message']!r} does not name {r['arg']!r}")
    assert not bad, "\n".join(bad)


@pytest.mark.fake_kernels
def test_meta_tensors_give_64_bit_shapes():
    """Shapes past 2^31 elements through the fake kernels (what torch.compile and export see)."""
    from mmdcnv2.ops import deform_conv2d, deform_roi_pool

    x = torch.empty(1, 2, 2**17, 2**17, device="meta")
    off = torch.empty(1, 18, 2**17, 2**17, device="meta")
    y = deform_conv2d(x, off, torch.empty(3, 2, 3, 3, device="meta"), padding=1)
    assert y.shape == (1, 3, 2**17, 2**17) and y.numel() > 2**31
    p = deform_roi_pool(
        torch.empty(1, 2**16, 64, 64, device="meta"),
        torch.empty(2**8, 5, device="meta"),
        None,
        output_size=(2**4, 2**4),
    )
    assert p.shape == (2**8, 2**16, 2**4, 2**4) and p.numel() > 2**31


_RSS_SCRIPT = r"""
import gc, json, torch, mmdcnv2
from mmdcnv2.ops import deform_conv2d, deform_roi_pool

def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS")) * 1024

x = torch.randn(2, 8, 12, 12, requires_grad=True)
off = torch.randn(2, 36, 12, 12, requires_grad=True)
m = torch.rand(2, 18, 12, 12, requires_grad=True)
w = torch.randn(8, 4, 3, 3, requires_grad=True)
feat = torch.randn(2, 8, 16, 16, requires_grad=True)
rois = torch.tensor([[0, 1.0, 1, 12, 14], [1, 3, 2, 15, 9]])
poff = torch.randn(2, 2, 7, 7, requires_grad=True)

def valid():
    y = deform_conv2d(x, off, w, None, 1, 1, 1, mask=m)
    p = deform_roi_pool(feat, rois, poff, 7, 1.0, 2)
    (y.sum() + p.sum()).backward()

def failing():
    for call in (lambda: deform_conv2d(x, off[:, :17], w, padding=1),
                 lambda: torch.ops.mmdcnv2.deform_conv2d(x, w, off, m[:, :3], None, [1, 1], [1, 1], [1, 1], 2, 2),
                 lambda: deform_roi_pool(feat, rois[:, :4], None),
                 lambda: torch.ops.mmdcnv2.deform_roi_pool(feat, rois * 0 + 5, None, 7, 7, 1.0, 2, 0.1)):
        try:
            call()
        except (ValueError, RuntimeError):
            pass
        else:
            raise AssertionError("a malformed call did not raise")

out = {}
for name, fn in (("valid", valid), ("failing", failing)):
    for _ in range(50):  # warm-up: allocator pools, lazy initialisation
        fn()
    gc.collect()
    before = rss()
    for _ in range(200):
        fn()
    gc.collect()
    out[name] = rss() - before
print(json.dumps(out))
"""


@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="under AddressSanitizer, freed memory stays in its quarantine (tools/sanitize.sh)",
)
def test_memory_does_not_grow_over_repeated_calls():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = json.loads(proc.stdout.strip().splitlines()[-1])
    # 200 calls: a leak of one small tensor per call would already show as hundreds of KiB
    for name, grew in growth.items():
        assert grew < 2**20, f"{name} calls: RSS grew by {grew / 2**20:.1f} MiB over 200 calls"


if __name__ == "__main__" and sys.argv[1:] == ["--cases"]:
    _run_cases()
