"""The main job: dataset, training with `mim train`, COCO evaluation with `mim test`, a picture.

    python tools/run_main.py [--config CONFIG] [--iters N] [--data data/shapes]

1. writes the embedded synthetic dataset (reused when already there);
2. trains the config on the CPU through `mim train mmdet CONFIG --gpus 0`;
3. evaluates the final checkpoint through `mim test mmdet CONFIG --checkpoint ...`;
4. prints the COCO box mAP and leaves, in a new work directory under work_dirs/
   (never one that exists), the logs, the checkpoint, the predictions (results.pkl) and
   detections.png: 4 validation images, ground truth beside detections, at twice the size.
"""

import argparse
import os
import subprocess
import sys
import time

from mim_jobs import ROOT, coco_metrics, data_options, last_checkpoint, subprocess_env, test_cmd, train_cmd

DEFAULT_CONFIG = "configs/shapes/faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py"


def run(cmd, log_path):
    """Runs cmd, streaming its output (it shows progress) and keeping a copy in log_path."""
    print("$", " ".join(cmd), flush=True)
    env = subprocess_env()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            log.write(line)
            if "Iter(" in line or "bbox_mAP" in line or "Error" in line or "Traceback" in line or "Epoch(" in line:
                print("  " + line.rstrip().split(" - ")[-1][:150], flush=True)
        if proc.wait() != 0:
            sys.exit(f"command failed ({proc.returncode}); full output in {log_path}")
    with open(log_path) as f:
        return f.read()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the config's)")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--work-dir", default=None, help="must not exist yet (default: work_dirs/main-<time>)")
    p.add_argument("--num-train", type=int, default=None, help="training images (default: the generator's, 1000)")
    p.add_argument(
        "--picture-images",
        type=lambda s: [int(v) for v in s.split(",")],
        default=[0, 1, 2, 3],
        help="validation image ids drawn in detections.png (default 0,1,2,3)",
    )
    a = p.parse_args()
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    from mmdcnv2.datasets import make_shapes_dataset

    t0 = time.time()
    print("[1/4] dataset", flush=True)
    make_shapes_dataset(a.data, **({"num_train": a.num_train} if a.num_train else {}))
    work_dir = a.work_dir or os.path.join("work_dirs", time.strftime("main-%Y%m%d-%H%M%S"))
    if os.path.exists(work_dir):
        sys.exit(f"{work_dir} exists: choose a new --work-dir (nothing is overwritten)")
    os.makedirs(work_dir)
    options = data_options(a.data, a.iters)
    print(f"[2/4] training {a.config} on the CPU (work dir {work_dir})", flush=True)
    run(train_cmd(a.config, work_dir, options), os.path.join(work_dir, "train_output.txt"))
    ckpt = last_checkpoint(work_dir)
    if not ckpt:
        sys.exit(f"no checkpoint in {work_dir}")
    print(f"[3/4] COCO evaluation of {ckpt}", flush=True)
    show_dir = "detections"
    results = os.path.join(work_dir, "results.pkl")
    out = run(
        test_cmd(a.config, ckpt, work_dir, options, show_dir) + ["--out", results],
        os.path.join(work_dir, "test_output.txt"),
    )
    metrics = coco_metrics(out)
    print("[4/4] picture", flush=True)
    from mmdcnv2.visualization import draw_detection_grid

    picture = draw_detection_grid(
        results,
        os.path.join(a.data, "annotations", "val.json"),
        a.data,
        os.path.join(work_dir, "detections.png"),
        image_ids=a.picture_images,
        scale=2,
        score_thr=0.5,
    )
    print("\n==== main job done in %.1f min ====" % ((time.time() - t0) / 60))
    if metrics:
        ap, ap50, ap75 = metrics
        print(f"COCO box mAP {ap:.3f}  (AP50 {ap50:.3f}, AP75 {ap75:.3f}) on {a.data}/annotations/val.json")
    else:
        print("no COCO mAP found in the test output:", os.path.join(work_dir, "test_output.txt"))
    print(
        f"work dir: {work_dir}  (logs, {os.path.basename(ckpt)}, results.pkl, {os.path.basename(picture)}; "
        f"every validation image drawn in {work_dir}/<time>/{show_dir}/)"
    )


if __name__ == "__main__":
    main()
