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
