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
    ablation.main(["--rows", "mimic", "--iters", "2", "--data", data, "--out", out, "--poll", "2",
                   "--timing-iters", "3"])
    with open(os.path.join(out, "ablation.json")) as f:
        rows = json.load(f)["rows"]
    row = rows["mimic"]
    assert row["state"] == "done" and 0 <= row["ap"] <= 1 and row["s_per_iter"] > 0
    assert row["checkpoint"].endswith("iter_2.pth") and os.path.exists(row["checkpoint"])
    with open(os.path.join(out, "ablation.md")) as f:
        table = f.read()
    line = [ln for ln in table.splitlines() if ln.startswith("| + mimicking")][0]
    assert f"{row['ap']:.3f}" in line and "| c3-c5 | yes | mdpool | yes |" in line
    assert os.path.getsize(os.path.join(out, "ablation.png")) > 10_000
    # the mimicking row's log has the branch's scalars
    log = open(os.path.join(out, "work", "mimic", "train_output.txt")).read()
    assert "loss_mimic" in log and "mimic_cos" in log and "mean cosine similarity" in log
    assert os.path.isdir(os.path.join(out, "work", "mimic-timing"))
    # --reuse takes the finished row instead of training it again
    again = str(tmp_path / "again")
    ablation.main(["--rows", "mimic", "--data", data, "--out", again, "--reuse", out, "--timing-iters", "0"])
    with open(os.path.join(again, "ablation.json")) as f:
        assert json.load(f)["rows"]["mimic"]["ap"] == row["ap"]
    assert not os.path.exists(os.path.join(again, "work"))
    # an existing results folder is never reused
    with pytest.raises(SystemExit, match="exists"):
        ablation.main(["--rows", "regular", "--iters", "2", "--data", data, "--out", out])
    with pytest.raises(SystemExit, match="unknown"):
        ablation.main(["--rows", "dcnv3", "--out", str(tmp_path / "other")])
    assert not os.path.exists(tmp_path / "other")


def test_result_parsers():
    out = ("x - Iter(test) [3/3]    coco/bbox_mAP: 0.1230  coco/bbox_mAP_50: 0.4560  coco/bbox_mAP_75: 0.0780  "
           "coco/bbox_mAP_s: 0.0000")
    assert mim_jobs.coco_metrics(out) == (0.123, 0.456, 0.078)
    assert mim_jobs.coco_metrics("no metrics") is None
    assert mim_jobs.train_progress("Iter(train) [ 25/700]  lr: 1\nIter(train) [ 50/700]  lr: 1") == (50, 700)
    opts = mim_jobs.data_options("d", iters=8)
    assert "train_dataloader.dataset.data_root=d/" in opts and "train_cfg.max_iters=8" in opts
