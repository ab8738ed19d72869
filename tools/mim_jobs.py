"""What tools/run_main.py and tools/ablation.py share: `mim train` / `mim test` command lines
on the embedded dataset, and reading their results (COCO metrics, time per iteration)."""

import glob
import json
import os
import re
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIM = [sys.executable, "-m", "mim"]


def data_options(data, iters=None):
    """--cfg-options that point a shapes config at the dataset in ``data`` (and shorten it)."""
    options = [
        f"{loader}.dataset.data_root={data}/" for loader in ("train_dataloader", "val_dataloader", "test_dataloader")
    ]
    options += [f"{ev}.ann_file={data}/annotations/val.json" for ev in ("val_evaluator", "test_evaluator")]
    if iters:
        options += [
            f"train_cfg.max_iters={iters}",
            f"train_cfg.val_interval={iters}",
            f"default_hooks.checkpoint.interval={iters}",
            f"default_hooks.logger.interval={max(1, min(25, iters // 2))}",
        ]
    return options


def train_cmd(config, work_dir, options):
    return MIM + ["train", "mmdet", config, "--gpus", "0", "--work-dir", work_dir, "--cfg-options", *options]


def test_cmd(config, checkpoint, work_dir, options, show_dir=None):
    cmd = MIM + ["test", "mmdet", config, "--checkpoint", checkpoint, "--gpus", "0", "--work-dir", work_dir]
    if show_dir:
        cmd += ["--show-dir", show_dir]
    return cmd + ["--cfg-options", *options]


def subprocess_env(**extra):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def last_checkpoint(work_dir):
    ckpts = sorted(glob.glob(os.path.join(work_dir, "iter_*.pth")), key=lambda s: int(re.findall(r"\d+", s)[-1]))
    return ckpts[-1] if ckpts else None


def coco_metrics(test_output):
    """(AP, AP50, AP75) from the output of `mim test` with CocoMetric, or None."""
    m = re.findall(r"coco/bbox_mAP: ([0-9.]+)\s+coco/bbox_mAP_50: ([0-9.]+)\s+coco/bbox_mAP_75: ([0-9.]+)", test_output)
    return tuple(float(v) for v in m[-1]) if m else None


COCO_KEYS = {"ap": "mAP", "ap50": "mAP_50", "ap75": "mAP_75", "ap_s": "mAP_s", "ap_m": "mAP_m", "ap_l": "mAP_l"}


def coco_metric_dict(test_output):
    """{ap, ap50, ap75, ap_s, ap_m, ap_l} from the last evaluation in the output of `mim test`, or
    None without one. A size with no objects in the split (pycocotools' -1) is None."""
    lines = [ln for ln in test_output.splitlines() if "coco/bbox_mAP:" in ln]
    if not lines:
        return None
    out = {}
    for key, name in COCO_KEYS.items():
        m = re.search(r"coco/bbox_" + name + r": (-?[0-9.]+)", lines[-1])
        value = float(m.group(1)) if m else None
        out[key] = value if value is not None and value >= 0 else None
    return out


def train_progress(log_text):
    """(iteration, max_iters) of the last training log line, or None."""
    m = re.findall(r"Iter\(train\)\s*\[\s*(\d+)/(\d+)\]", log_text)
    return (int(m[-1][0]), int(m[-1][1])) if m else None


def seconds_per_iter(work_dir):
    """Median of the 'time' that mmengine logs for training iterations (the first logged
    window, which holds the warm-up, is left out when there are others)."""
    times = []
    for path in glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json")):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if "time" in row and "loss" in row:
                    times.append(row["time"])
    if len(times) > 1:
        times = times[1:]
    return statistics.median(times) if times else None
