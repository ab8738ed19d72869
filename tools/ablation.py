"""The DCNv2 ablation on the embedded dataset, in the layout of the paper's table.

    python tools/ablation.py [--jobs 2] [--iters N] [--rows regular,dcnv1,...] [--out DIR]

Trains every row with `mim train` (same schedule, same seed: configs/shapes/_base_shapes.py),
evaluates it with `mim test` (COCO box AP with pycocotools on the validation split), and
writes DIR/ablation.md, DIR/ablation.json and DIR/ablation.png (default DIR:
results/ablation-<time>, never one that exists; work dirs inside it). Rows:

  regular      regular convolution, RoIAlign
  dcnv1        deformable conv in c5, deformable RoI pooling (DCNv1)
  dconv-c3-c5  deformable conv in c3-c5, deformable RoI pooling
  mdconv       + modulation in the convolutions
  mdpool       + modulated deformable RoI pooling (= the main job's detector)
  mimic        + R-CNN feature mimicking (DCNv2)

--jobs N trains N rows side by side, each with cores/N threads (two at a time on a
2-core machine halve the wall time). The time per iteration in the table is measured
afterwards, one row at a time with all cores, over a short run of --timing-iters
iterations (median of the logged windows after the first): side-by-side jobs, or anything
else running on the machine, would skew it. --reuse DIR takes the rows that finished in an
earlier run's DIR/ablation.json (metrics and checkpoints) instead of training them again.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time

from mim_jobs import (ROOT, coco_metrics, data_options, last_checkpoint, seconds_per_iter, subprocess_env,
                      test_cmd, train_cmd, train_progress)

S = "configs/shapes/"
# name, config, deformable conv stages, modulated conv, RoI pooling, mimicking
ROWS = [
    ("regular", S + "faster-rcnn_r18_fpn_shapes.py", "", False, "RoIAlign", False),
    ("dcnv1", S + "faster-rcnn_r18-dconv-c5-dpool_fpn_shapes.py", "c5", False, "dpool", False),
    ("dconv-c3-c5", S + "faster-rcnn_r18-dcnv1-dpool_fpn_shapes.py", "c3-c5", False, "dpool", False),
    ("mdconv", S + "faster-rcnn_r18-mdconv-c3-c5-dpool_fpn_shapes.py", "c3-c5", True, "dpool", False),
    ("mdpool", S + "faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py", "c3-c5", True, "mdpool", False),
    ("mimic", S + "faster-rcnn_r18-dcnv2-mdpool-mimic_fpn_shapes.py", "c3-c5", True, "mdpool", True),
]
LABELS = {"regular": "regular conv", "dcnv1": "DCNv1", "dconv-c3-c5": "dconv c3-c5", "mdconv": "+ modulation",
          "mdpool": "+ mdpool", "mimic": "+ mimicking (DCNv2)"}


def run_row(row, out_dir, data, iters, threads, status):
    name, config = row[0], row[1]
    work = os.path.join(out_dir, "work", name)
    os.makedirs(work)
    options = data_options(data, iters)
    env = subprocess_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    t0 = time.time()
    train_log = os.path.join(work, "train_output.txt")
    status[name] = dict(state="training", log=train_log)
    with open(train_log, "w") as log:
        rc = subprocess.call(train_cmd(config, work, options), cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    ckpt = last_checkpoint(work)
    if rc != 0 or ckpt is None:
        status[name] = dict(state=f"training failed (rc {rc}): {train_log}")
        return
    test_log = os.path.join(work, "test_output.txt")
    status[name] = dict(state="testing", log=test_log)
    with open(test_log, "w") as log:
        rc = subprocess.call(test_cmd(config, ckpt, work, options), cwd=ROOT, env=env, stdout=log,
                             stderr=subprocess.STDOUT)
    with open(test_log) as f:
        metrics = coco_metrics(f.read())
    if rc != 0 or metrics is None:
        status[name] = dict(state=f"testing failed (rc {rc}): {test_log}")
        return
    status[name] = dict(state="done", ap=metrics[0], ap50=metrics[1], ap75=metrics[2], s_per_iter=None,
                        s_per_iter_jobs=seconds_per_iter(work), minutes=(time.time() - t0) / 60, checkpoint=ckpt)


def time_row(row, out_dir, data, iters, status):
    """Seconds per training iteration of ``row``: a short run alone, with every core."""
    name, config = row[0], row[1]
    work = os.path.join(out_dir, "work", name + "-timing")
    os.makedirs(work)
    options = data_options(data, iters) + [f"default_hooks.logger.interval={max(1, iters // 5)}",
                                           f"default_hooks.checkpoint.interval={iters + 1}"]
    with open(os.path.join(work, "train_output.txt"), "w") as log:
        rc = subprocess.call(train_cmd(config, work, options), cwd=ROOT, env=subprocess_env(), stdout=log,
                             stderr=subprocess.STDOUT)
    status[name]["s_per_iter"] = seconds_per_iter(work) if rc == 0 else None


def progress_line(status):
    parts = []
    for name, st in status.items():
        if st.get("state") == "training" and os.path.exists(st["log"]):
            with open(st["log"], errors="replace") as f:
                p = train_progress(f.read())
            parts.append(f"{name} {p[0]}/{p[1]}" if p else f"{name} starting")
        else:
            parts.append(f"{name} {st.get('state', 'waiting')}")
    return " | ".join(parts)


def markdown(rows, status, meta):
    check = {True: "yes", False: ""}
    lines = [f"Embedded shapes dataset, {meta['iters']} iterations from scratch, seed 0, {meta['machine']}; "
             f"trained {meta['jobs']} job(s) side by side with {meta['threads']} thread(s) each; s/iter: "
             + (f"{meta['timing_iters']} iterations of each row alone, all cores." if meta["timing_iters"] else
                "measured during training."), "",
             "| | deformable conv | modulation | RoI pooling | mimicking | box AP | AP50 | AP75 | s/iter |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, _, stages, modulated, pool, mimic in rows:
        st = status[name]
        if st.get("state") == "done":
            t = st.get("s_per_iter") or st.get("s_per_iter_jobs")
            spi = "n/a" if t is None else f"{t:.2f}"
            nums = f"{st['ap']:.3f} | {st['ap50']:.3f} | {st['ap75']:.3f} | {spi}"
        else:
            nums = f"{st.get('state', 'not run')} | | | "
        lines.append(f"| {LABELS[name]} | {stages or '-'} | {check[modulated]} | {pool} | {check[mimic]} | {nums} |")
    return "\n".join(lines) + "\n"


def plot(rows, status, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r[0] for r in rows if status[r[0]].get("state") == "done"]
    if not done:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[3, 1.4]))
    width = 0.27
    for i, (key, label) in enumerate((("ap", "box AP"), ("ap50", "AP50"), ("ap75", "AP75"))):
        xs = [j + (i - 1) * width for j in range(len(done))]
        bars = ax.bar(xs, [status[n][key] for n in done], width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(done)), [LABELS[n] for n in done], rotation=20, ha="right")
    ax.set_ylabel("COCO metric (val)")
    ax.set_title("Ablation on the embedded dataset (same schedule and seed)")
    ax.legend(loc="upper left", fontsize=8)
    bars = bx.bar(range(len(done)), [status[n].get("s_per_iter") or status[n].get("s_per_iter_jobs") or 0
                                           for n in done], color="gray")
    bx.bar_label(bars, fmt="%.2f", fontsize=7)
    bx.set_xticks(range(len(done)), [LABELS[n] for n in done], rotation=20, ha="right")
    bx.set_ylabel("seconds per training iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(r[0] for r in ROWS), help="comma-separated subset of the rows")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the configs', 700)")
    p.add_argument("--jobs", type=int, default=1, help="rows trained side by side")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--out", default=None, help="results folder; must not exist (default results/ablation-<time>)")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--timing-iters", type=int, default=30, help="iterations of the timing run per row (0: none)")
    p.add_argument("--reuse", default=None, help="an earlier results folder: its finished rows are not retrained")
    a = p.parse_args(argv)
    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    known = [r[0] for r in ROWS]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        sys.exit(f"--rows: unknown {unknown or 'empty'}; choose from {', '.join(known)}")
    if a.jobs < 1:
        sys.exit("--jobs must be >= 1")
    rows = [r for r in ROWS if r[0] in names]
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    from mmdcnv2.datasets import make_shapes_dataset

    out = a.out or os.path.join("results", time.strftime("ablation-%Y%m%d-%H%M%S"))
    if os.path.exists(out):
        sys.exit(f"{out} exists: choose a new --out (nothing is overwritten)")
    if os.path.exists(os.path.join(a.data, "annotations", "train.json")):
        print("dataset:", a.data, flush=True)
    else:
        make_shapes_dataset(a.data)
    os.makedirs(out)
    jobs = min(a.jobs, len(rows))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    status = {r[0]: {} for r in rows}
    earlier_meta = {}
    if a.reuse:
        with open(os.path.join(a.reuse, "ablation.json")) as f:
            earlier_json = json.load(f)
        earlier, earlier_meta = earlier_json["rows"], earlier_json.get("meta", {})
        for name in status:
            if earlier.get(name, {}).get("state") == "done":
                status[name] = {k: v for k, v in earlier[name].items() if k != "config"}
                print(f"{name}: reusing the result in {a.reuse}", flush=True)
    pending = [r for r in rows if status[r[0]].get("state") != "done"]
    trained = list(pending)
    running = []
    t0 = time.time()
    print(f"{len(rows)} rows, {jobs} at a time, {threads} thread(s) each; results in {out}", flush=True)
    while pending or running:
        running = [t for t in running if t.is_alive()]
        while pending and len(running) < jobs:
            row = pending.pop(0)
            t = threading.Thread(target=run_row, args=(row, out, a.data, a.iters, threads, status), daemon=True)
            t.start()
            running.append(t)
        if running:
            for t in running:
                t.join(timeout=a.poll / max(1, len(running)))
            print(f"[{(time.time() - t0) / 60:5.1f} min] {progress_line(status)}", flush=True)
    if a.timing_iters > 0:
        for row in rows:
            if status[row[0]].get("state") == "done":
                print(f"timing {row[0]}: {a.timing_iters} iterations alone", flush=True)
                time_row(row, out, a.data, a.timing_iters, status)
    import platform

    if not any(r in rows for r in trained):  # every row came from --reuse: keep how they were trained
        jobs, threads = earlier_meta.get("jobs", jobs), earlier_meta.get("threads", threads)
    meta = dict(iters=a.iters or 700, jobs=jobs, threads=threads, timing_iters=a.timing_iters,
                machine=f"{os.cpu_count()}-core {platform.machine()} CPU", minutes=(time.time() - t0) / 60)
    table = markdown(rows, status, meta)
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(table)
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(dict(meta=meta, rows={r[0]: dict(config=r[1], **status[r[0]]) for r in rows}), f, indent=1)
    plot(rows, status, os.path.join(out, "ablation.png"))
    print("\n" + table)
    print(f"written: {out}/ablation.md, ablation.json, ablation.png ({meta['minutes']:.1f} min)")
    failed = [n for n, st in status.items() if st.get("state") != "done"]
    if failed:
        sys.exit(f"rows that did not finish: {', '.join(failed)} (see their logs under {out}/work)")


if __name__ == "__main__":
    main()
