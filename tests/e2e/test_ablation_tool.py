"""tools/ablation.py end to end on a tiny dataset (one row, two iterations), and its refusals."""

import json
import os
import sys

import pytest

pytest.importorskip("mmdet")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import ablation  # noqa: E402
import mim_jobs  # noqa: E402

from mmdcnv2.datasets import make_shapes_dataset  # noqa: E402


def test_ablation_tool_trains_evaluates_and_writes_the_table(tmp_path, capsys):
    data = str(tmp_path / "shapes")
    make_shapes_dataset(data, num_train=6, num_val=3, size=96, progress=None)
    out = str(tmp_path / "results")
    ablation.main(
        [
            "--rows",
            "mimic",
            "--seeds",
            "0,1",
            "--iters",
            "2",
            "--data",
            data,
            "--out",
            out,
            "--poll",
            "2",
            "--timing-iters",
            "3",
            "--jobs",
            "2",
        ]
    )
    with open(os.path.join(out, "ablation.json")) as f:
        result = json.load(f)
    runs = [result["runs"][f"mimic/seed{s}"] for s in (0, 1)]
    for seed, run in zip((0, 1), runs):
        assert run["state"] == "done" and 0 <= run["ap"] <= 1 and run["seed"] == seed
        assert run["checkpoint"].endswith("iter_2.pth") and os.path.exists(run["checkpoint"])
        # the seed reached the training (mmengine logs it)
        log = open(os.path.join(out, "work", "mimic", f"seed{seed}", "train_output.txt")).read()
        assert f"seed: {seed}" in log
    summary = result["summary"]["mimic"]
    aps = [r["ap"] for r in runs]
    assert summary["n"] == 2 and summary["ap"] == aps
    assert summary["ap_mean"] == pytest.approx(sum(aps) / 2)
    assert summary["ap_std"] == pytest.approx(abs(aps[0] - aps[1]) / 2**0.5)
    assert result["timing"]["mimic"] > 0
    with open(os.path.join(out, "ablation.md")) as f:
        table = f.read()
    line = [ln for ln in table.splitlines() if ln.startswith("| + mimicking")][0]
    assert f"{summary['ap_mean']:.3f} ± {summary['ap_std']:.3f}" in line and "| c3-c5 | yes | mdpool | yes |" in line
    assert f"{aps[0]:.3f}, {aps[1]:.3f}" in line
    assert os.path.getsize(os.path.join(out, "ablation.png")) > 10_000
    # the mimicking runs' logs have the branch's scalars
    log = open(os.path.join(out, "work", "mimic", "seed0", "train_output.txt")).read()
    assert "loss_mimic" in log and "mimic_cos" in log and "mean cosine similarity" in log
    assert os.path.isdir(os.path.join(out, "work", "mimic-timing"))
    # --reuse takes the finished runs instead of training them again
    again = str(tmp_path / "again")
    ablation.main(
        ["--rows", "mimic", "--seeds", "0,1", "--data", data, "--out", again, "--reuse", out, "--timing-iters", "0"]
    )
    with open(os.path.join(again, "ablation.json")) as f:
        assert json.load(f)["summary"]["mimic"]["ap"] == aps
    assert not os.path.exists(os.path.join(again, "work"))
    # an existing results folder is never reused; bad arguments are refused before anything is written
    with pytest.raises(SystemExit, match="exists"):
        ablation.main(["--rows", "regular", "--iters", "2", "--data", data, "--out", out])
    with pytest.raises(SystemExit, match="unknown"):
        ablation.main(["--rows", "dcnv3", "--out", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="--seeds"):
        ablation.main(["--seeds", "0,0", "--out", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="--seeds"):
        ablation.main(["--seeds", "a", "--out", str(tmp_path / "other")])
    assert not os.path.exists(tmp_path / "other")


def test_step_verdicts_compare_the_change_with_the_spread():
    rows = [r for r in ablation.ROWS if r[0] in ("regular", "dcnv1", "dconv-c3-c5")]
    status = {}
    for name, aps in (
        ("regular", [0.30, 0.32, 0.31]),
        ("dcnv1", [0.40, 0.41, 0.42]),
        ("dconv-c3-c5", [0.39, 0.43, 0.41]),
    ):
        for seed, ap in enumerate(aps):
            status[(name, seed)] = dict(state="done", ap=ap, ap50=ap, ap75=ap)
    summary = ablation.summarize(rows, [0, 1, 2], status)
    steps = ablation.step_verdicts(rows, summary)
    assert [s["larger"] for s in steps] == [True, False]
    assert steps[0]["delta"] == pytest.approx(0.10)
    assert steps[1]["spread"] == pytest.approx(0.01 + 0.02)
    # paired by seed: +0.10, +0.09, +0.11 (same sign), then -0.01, +0.02, -0.01
    assert steps[0]["paired"] == pytest.approx([0.10, 0.09, 0.11]) and steps[0]["same_sign"]
    assert steps[1]["paired"] == pytest.approx([-0.01, 0.02, -0.01]) and not steps[1]["same_sign"]
    table, _, _ = ablation.markdown(
        rows, [0, 1, 2], status, {}, dict(iters=600, machine="m", jobs=2, threads=1, timing_iters=0)
    )
    assert "| regular conv -> DCNv1 | +0.100 | 0.020 | **yes** | +0.100, +0.090, +0.110 | **yes** |" in table


def test_result_parsers():
    out = (
        "x - Iter(test) [3/3]    coco/bbox_mAP: 0.1230  coco/bbox_mAP_50: 0.4560  coco/bbox_mAP_75: 0.0780  "
        "coco/bbox_mAP_s: 0.0000"
    )
    assert mim_jobs.coco_metrics(out) == (0.123, 0.456, 0.078)
    assert mim_jobs.coco_metrics("no metrics") is None
    assert mim_jobs.train_progress("Iter(train) [ 25/700]  lr: 1\nIter(train) [ 50/700]  lr: 1") == (50, 700)
    opts = mim_jobs.data_options("d", iters=8)
    assert "train_dataloader.dataset.data_root=d/" in opts and "train_cfg.max_iters=8" in opts
