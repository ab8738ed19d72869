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


def test_step_stats_give_paired_changes_with_t_intervals():
    from scipy import stats

    rows = [r for r in ablation.ROWS if r[0] in ("regular", "dcnv1", "dconv-c3-c5")]
    status = {}
    aps = {
        "regular": [0.30, 0.32, 0.31, 0.29],
        "dcnv1": [0.40, 0.41, 0.42, 0.40],
        "dconv-c3-c5": [0.39, 0.43, 0.41, 0.42],
    }
    for name, values in aps.items():
        for seed, ap in enumerate(values):
            # AP large undefined (no large objects), AP small only for three seeds of dcnv1
            ap_s = None if (name == "dcnv1" and seed == 3) else ap / 2
            status[(name, seed)] = dict(state="done", ap=ap, ap50=ap + 0.4, ap75=ap, ap_s=ap_s, ap_m=ap, ap_l=None)
    status[("dconv-c3-c5", 3)] = dict(state="training failed (rc 1): log")
    seeds = [0, 1, 2, 3]
    summary = ablation.summarize(rows, seeds, status)
    assert summary["dconv-c3-c5"]["n"] == 3 and summary["dconv-c3-c5"]["seeds"] == [0, 1, 2]
    ci = stats.t.interval(0.95, 3, loc=0, scale=stats.sem(aps["regular"]))[1]
    assert summary["regular"]["ap_ci"] == pytest.approx(ci)
    assert summary["regular"]["ap_l_mean"] is None and summary["regular"]["ap_l_ci"] is None
    steps = ablation.step_stats(rows, summary)
    # regular -> dcnv1, dcnv1 -> dconv c3-c5, then regular -> dconv c3-c5
    assert [(s["frm"], s["to"]) for s in steps] == [
        ("regular", "dcnv1"),
        ("dcnv1", "dconv-c3-c5"),
        ("regular", "dconv-c3-c5"),
    ]
    for step in steps:
        common = step["seeds"]
        a = [aps[step["frm"]][s] for s in common]
        b = [aps[step["to"]][s] for s in common]
        m = step["metrics"]["ap"]
        assert m["paired"] == pytest.approx([y - x for x, y in zip(a, b)])
        reference = stats.ttest_rel(b, a).confidence_interval(0.95)
        assert (m["low"], m["high"]) == pytest.approx((reference.low, reference.high))
        assert m["excludes_zero"] == (reference.low > 0 or reference.high < 0)
        assert step["metrics"]["ap_l"]["mean"] is None
    assert steps[0]["seeds"] == [0, 1, 2, 3] and steps[1]["seeds"] == [0, 1, 2]
    assert steps[0]["metrics"]["ap"]["excludes_zero"] and not steps[1]["metrics"]["ap"]["excludes_zero"]
    assert len(steps[0]["metrics"]["ap_s"]["paired"]) == 3  # the seed without AP small is left out
    table, _, _ = ablation.markdown(
        rows, seeds, status, {}, dict(iters=600, machine="m", jobs=2, threads=1, timing_iters=0)
    )
    m = steps[0]["metrics"]["ap"]
    assert (
        f"| regular conv -> DCNv1 | 4 | +0.100, +0.090, +0.110, +0.110 | **{m['mean']:+.3f} [{m['low']:+.3f}, " in table
    )
    line = [ln for ln in table.splitlines() if ln.startswith("| DCNv1 -> dconv c3-c5 |")][0]
    assert "**" not in line and line.rstrip().endswith("| n/a |")
    assert "| regular conv -> dconv c3-c5 | 3 |" in table
    assert [ln for ln in table.splitlines() if ln.startswith("| dconv c3-c5 |")][0].count("failed") == 1


def test_hard_option_checks_the_split(tmp_path):
    data = str(tmp_path / "shapes")
    make_shapes_dataset(data, num_train=2, num_val=1, size=64, progress=None)
    with pytest.raises(SystemExit, match="'default' split"):
        ablation.main(["--hard", "--data", data, "--out", str(tmp_path / "out"), "--iters", "1"])
    assert not os.path.exists(tmp_path / "out")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "ablation.json").write_text(json.dumps(dict(meta=dict(variant="hard"), runs={}, timing={})))
    with pytest.raises(SystemExit, match="'hard' split"):
        ablation.main(["--data", data, "--out", str(tmp_path / "out"), "--reuse", str(earlier)])
    with pytest.raises(SystemExit, match="no ablation.json"):
        ablation.main(["--data", data, "--out", str(tmp_path / "out"), "--reuse", str(tmp_path)])
    assert not os.path.exists(tmp_path / "out")


def test_result_parsers():
    out = (
        "x - Iter(test) [3/3]    coco/bbox_mAP: 0.1230  coco/bbox_mAP_50: 0.4560  coco/bbox_mAP_75: 0.0780  "
        "coco/bbox_mAP_s: 0.0000"
    )
    assert mim_jobs.coco_metrics(out) == (0.123, 0.456, 0.078)
    assert mim_jobs.coco_metrics("no metrics") is None
    full = out + "  coco/bbox_mAP_m: 0.2000  coco/bbox_mAP_l: -1.0000"
    assert mim_jobs.coco_metric_dict(full) == dict(ap=0.123, ap50=0.456, ap75=0.078, ap_s=0.0, ap_m=0.2, ap_l=None)
    assert mim_jobs.coco_metric_dict("no metrics") is None
    assert mim_jobs.train_progress("Iter(train) [ 25/700]  lr: 1\nIter(train) [ 50/700]  lr: 1") == (50, 700)
    opts = mim_jobs.data_options("d", iters=8)
    assert "train_dataloader.dataset.data_root=d/" in opts and "train_cfg.max_iters=8" in opts
