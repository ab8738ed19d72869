"""tools/benchmark.py's detector iteration compares like with like: the three detectors (plain, DCNv2 with
mmcv's layers, DCNv2 with ours) get the plain detector's weights and compute the same function."""

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import benchmark  # noqa: E402


def test_detector_variants_compute_the_same_function():
    pytest.importorskip("mmdet")
    pytest.importorskip("mmcv.ops")
    times, losses = benchmark.bench_detector("cpu", reps=1, side=64)
    assert len(losses) == 3 and set(losses) == set(k for k in times if not k.endswith(" spread"))
    values = list(losses.values())
    assert all(v > 0 and torch.isfinite(torch.tensor(v)) for v in values)
    # plain weights everywhere, offsets zero, the 0.5 masks compensated: the same loss up to rounding
    for name, v in losses.items():
        assert v == pytest.approx(values[0], rel=1e-4), (name, losses)


def test_bad_repetitions_are_refused(capsys, monkeypatch):
    for flag in ("--reps", "--detector-reps"):
        monkeypatch.setattr(sys, "argv", ["benchmark.py", flag, "0"])
        with pytest.raises(SystemExit) as e:
            benchmark.main()
        assert e.value.code == 2
        assert f"{flag} must be at least 1" in capsys.readouterr().err


def test_quiet_watch_waits_for_slow_cores_and_names_what_ran_slow():
    """The benchmark's watch over the cores' multiply-add rate, fed a scripted sequence of rates: it waits while the
    rate is more than 10% below the run's best (at most max_wait_s), and names every measurement with a low sample
    before or after it in its warning."""
    rates = iter([100, 100, 50, 50, 98, 60, 40, 40, 100, 100])
    watch = benchmark.QuietWatch("cpu", rate_fn=lambda: next(rates), handoff_fn=lambda: 30.0)
    slept = []
    watch.sleep = slept.append
    assert watch.settle("a") == 0 and not watch.done("a")
    assert watch.settle("b") == 4.0 and slept == [2.0, 2.0]  # 50, 50, then 98: within 10% of 100
    assert watch.done("b")  # 60 after it
    assert watch.settle("c", max_wait_s=2.0) == 2.0  # still 40 when the wait runs out
    assert watch.done("c")  # fast after, slow before
    report = watch.finish()
    assert report["slowed"] == ["b", "c"]
    assert report["fma_peak"]["min"] == 40 and report["fma_peak"]["low"] == "before c"
    assert any("around: b, c" in w for w in report["warnings"]), report["warnings"]
    # nothing sampled (a GPU, or a CPU without the micro-kernels): no waiting, nothing marked
    quiet = benchmark.QuietWatch("cpu")
    quiet.rate_fn = quiet.handoff_fn = None
    assert quiet.settle("x") == 0 and not quiet.done("x")
    assert quiet.apart == [] and "handoff_ns" not in quiet.finish()


def test_quiet_watch_waits_for_one_last_level_cache_and_names_what_ran_on_two():
    """The watch over where the host placed the two threads, fed a scripted sequence of cache-line hand-off times:
    it waits while a hand-off is more than twice the run's best (and over 80 ns: the threads on two last-level
    caches), names the measurements with such a sample before or after them, and marks nothing in a run that never
    saw the threads on one cache."""
    handoffs = iter([30, 30, 170, 170, 28, 175, 170, 170, 30, 30])
    watch = benchmark.QuietWatch("cpu", rate_fn=lambda: 100.0, handoff_fn=lambda: next(handoffs))
    slept = []
    watch.sleep = slept.append
    assert watch.settle("a") == 0
    watch.done("a")
    assert watch.settle("b") == 4.0 and slept == [2.0, 2.0]  # 170, 170, then 28
    watch.done("b")  # 175 after it
    assert watch.settle("c", max_wait_s=2.0) == 2.0  # still 170 when the wait runs out
    watch.done("c")  # one cache after, two before
    report = watch.finish()
    assert report["apart"] == ["b", "c"] and report["slowed"] == []
    assert report["handoff_ns"]["min"] == 28 and report["handoff_ns"]["max"] == 175
    assert any("last-level cache" in w and "around: b, c" in w for w in report["warnings"]), report["warnings"]
    # always two caches (or a machine where the threads are far apart): nothing to wait for, nothing marked
    far = benchmark.QuietWatch("cpu", rate_fn=lambda: 100.0, handoff_fn=lambda: 170.0)
    far.sleep = slept.append
    assert far.settle("x") == 0
    far.done("x")
    assert far.apart == []
