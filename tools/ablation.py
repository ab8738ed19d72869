"""The DCNv2 ablation on the embedded dataset, in the layout of the paper's table, with error bars.

    python tools/ablation.py [--jobs 2] [--seeds 0,1,2] [--iters N] [--rows regular,dcnv1,...] [--out DIR]

Trains every row once per seed with `mim train` (same schedule: configs/shapes/_base_shapes.py,
the backbone from the pretrained checkpoint; `randomness.seed` = the seed), evaluates each with
`mim test` (COCO box AP with pycocotools on the validation split), and writes DIR/ablation.md
(mean ± sample standard deviation per row, every seed's AP, and for each step whether its change
of mean AP is larger than the spread), DIR/ablation.json and DIR/ablation.png (bars with error
bars, a dot per seed). Default DIR: results/ablation-<time>, never one that exists; work dirs
inside it (work/<row>/seed<k>). The files are rewritten after every finished run, so an
interrupted run leaves what it had. Rows:

  regular      regular convolution, RoIAlign
  dcnv1        deformable conv in c5, deformable RoI pooling (DCNv1)
  dconv-c3-c5  deformable conv in c3-c5, deformable RoI pooling
  mdconv       + modulation in the convolutions
  mdpool       + modulated deformable RoI pooling (= the main job's detector)
  mimic        + R-CNN feature mimicking (DCNv2), 8 positive RoIs per image, 64px crops
  mimic-large  the same with 16 RoIs and 80px crops (closer to the paper's 32 and 224px;
               not in the default --rows)

--jobs N trains N runs side by side, each with cores/N threads (two at a time on a 2-core
machine halve the wall time); runs go seed by seed (every row's first seed first). The time per
iteration in the table is measured afterwards, one row at a time with all cores, over a short run
of --timing-iters iterations (median of the logged windows after the first): side-by-side jobs,
or anything else running on the machine, would skew it. --reuse DIR (repeatable) takes the runs that
finished in an earlier run's DIR/ablation.json (metrics, checkpoints, timings) instead of training
them again, e.g. to add a row to a finished ablation.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

from mim_jobs import (
    ROOT,
    coco_metrics,
    data_options,
    last_checkpoint,
    seconds_per_iter,
    subprocess_env,
    test_cmd,
    train_cmd,
    train_progress,
)

S = "configs/shapes/"
# name, config, deformable conv stages, modulated conv, RoI pooling, mimicking
ROWS = [
    ("regular", S + "faster-rcnn_r18_fpn_shapes.py", "", False, "RoIAlign", False),
    ("dcnv1", S + "faster-rcnn_r18-dconv-c5-dpool_fpn_shapes.py", "c5", False, "dpool", False),
    ("dconv-c3-c5", S + "faster-rcnn_r18-dcnv1-dpool_fpn_shapes.py", "c3-c5", False, "dpool", False),
    ("mdconv", S + "faster-rcnn_r18-mdconv-c3-c5-dpool_fpn_shapes.py", "c3-c5", True, "dpool", False),
    ("mdpool", S + "faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py", "c3-c5", True, "mdpool", False),
    ("mimic", S + "faster-rcnn_r18-dcnv2-mdpool-mimic_fpn_shapes.py", "c3-c5", True, "mdpool", True),
    # not in the default rows: mimicking closer to the paper's setting (32 RoIs, 224px crops)
    (
        "mimic-large",
        S + "faster-rcnn_r18-dcnv2-mdpool-mimic-large_fpn_shapes.py",
        "c3-c5",
        True,
        "mdpool",
        "16 RoIs, 80px",
    ),
]
DEFAULT_ROWS = ("regular", "dcnv1", "dconv-c3-c5", "mdconv", "mdpool", "mimic")
LABELS = {
    "regular": "regular conv",
    "dcnv1": "DCNv1",
    "dconv-c3-c5": "dconv c3-c5",
    "mdconv": "+ modulation",
    "mdpool": "+ mdpool",
    "mimic": "+ mimicking (DCNv2)",
    "mimic-large": "+ mimicking, 16 RoIs, 80px",
}


def run_job(row, seed, out_dir, data, iters, threads, status):
    """Trains and evaluates one (row, seed) pair; its result goes to status[(row name, seed)]."""
    name, config = row[0], row[1]
    key = (name, seed)
    work = os.path.join(out_dir, "work", name, f"seed{seed}")
    os.makedirs(work)
    options = data_options(data, iters) + [f"randomness.seed={seed}"]
    env = subprocess_env(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    t0 = time.time()
    train_log = os.path.join(work, "train_output.txt")
    status[key] = dict(state="training", log=train_log)
    with open(train_log, "w") as log:
        rc = subprocess.call(train_cmd(config, work, options), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    ckpt = last_checkpoint(work)
    if rc != 0 or ckpt is None:
        status[key] = dict(state=f"training failed (rc {rc}): {train_log}")
        return
    test_log = os.path.join(work, "test_output.txt")
    status[key] = dict(state="testing", log=test_log)
    with open(test_log, "w") as log:
        rc = subprocess.call(
            test_cmd(config, ckpt, work, options), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    with open(test_log) as f:
        metrics = coco_metrics(f.read())
    if rc != 0 or metrics is None:
        status[key] = dict(state=f"testing failed (rc {rc}): {test_log}")
        return
    status[key] = dict(
        state="done",
        ap=metrics[0],
        ap50=metrics[1],
        ap75=metrics[2],
        s_per_iter_jobs=seconds_per_iter(work),
        minutes=(time.time() - t0) / 60,
        checkpoint=ckpt,
    )


def time_row(row, out_dir, data, iters, timing):
    """Seconds per training iteration of ``row``: a short run alone, with every core."""
    name, config = row[0], row[1]
    work = os.path.join(out_dir, "work", name + "-timing")
    os.makedirs(work)
    options = data_options(data, iters) + [
        f"default_hooks.logger.interval={max(1, iters // 5)}",
        f"default_hooks.checkpoint.interval={iters + 1}",
    ]
    with open(os.path.join(work, "train_output.txt"), "w") as log:
        rc = subprocess.call(
            train_cmd(config, work, options), cwd=ROOT, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT
        )
    timing[name] = seconds_per_iter(work) if rc == 0 else None


def progress_line(status):
    parts = []
    for (name, seed), st in status.items():
        label = f"{name}/s{seed}"
        if st.get("state") == "training" and os.path.exists(st["log"]):
            with open(st["log"], errors="replace") as f:
                p = train_progress(f.read())
            parts.append(f"{label} {p[0]}/{p[1]}" if p else f"{label} starting")
        elif st.get("state") in ("training", "testing"):
            parts.append(f"{label} {st['state']}")
    done = sum(st.get("state") == "done" for st in status.values())
    return f"{done}/{len(status)} done" + (" | " + " | ".join(parts) if parts else "")


KEYS = (("ap", "box AP"), ("ap50", "AP50"), ("ap75", "AP75"))


def summarize(rows, seeds, status):
    """Per row: mean and sample standard deviation of AP, AP50, AP75 over its finished seeds."""
    summary = {}
    for row in rows:
        done_seeds = [s for s in seeds if status[(row[0], s)].get("state") == "done"]
        done = [status[(row[0], s)] for s in done_seeds]
        entry = dict(n=len(done), seeds=done_seeds)
        for key, _ in KEYS:
            vals = [d[key] for d in done]
            entry[key] = vals
            entry[key + "_mean"] = statistics.mean(vals) if vals else None
            entry[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
        summary[row[0]] = entry
    return summary


def step_verdicts(rows, summary):
    """Each row against the row above it: the change of mean box AP, and whether it is larger
    than the spread (the two rows' mean +- std intervals do not overlap)."""
    out = []
    for prev, row in zip(rows, rows[1:]):
        a, b = summary[prev[0]], summary[row[0]]
        if a["ap_mean"] is None or b["ap_mean"] is None:
            continue
        delta = b["ap_mean"] - a["ap_mean"]
        spread = (a["ap_std"] or 0.0) + (b["ap_std"] or 0.0)
        known = a["ap_std"] is not None and b["ap_std"] is not None
        # paired by seed (a seed fixes the image order and the heads' initialisation in every row)
        common = [s for s in a["seeds"] if s in b["seeds"]]
        diffs = [b["ap"][b["seeds"].index(s)] - a["ap"][a["seeds"].index(s)] for s in common]
        out.append(
            dict(
                frm=prev[0],
                to=row[0],
                delta=delta,
                spread=spread,
                larger=(abs(delta) > spread) if known else None,
                paired=diffs,
                paired_std=statistics.stdev(diffs) if len(diffs) > 1 else None,
                same_sign=len(diffs) > 1 and (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)),
            )
        )
    return out


def _fmt(entry, key):
    if entry[key + "_mean"] is None:
        return "-"
    if entry[key + "_std"] is None:
        return f"{entry[key + '_mean']:.3f}"
    return f"{entry[key + '_mean']:.3f} ± {entry[key + '_std']:.3f}"


def markdown(rows, seeds, status, timing, meta):
    check = {True: "yes", False: ""}
    summary = summarize(rows, seeds, status)
    lines = [
        f"Embedded shapes dataset, {meta['iters']} iterations, seeds {', '.join(map(str, seeds))} "
        f"(mean ± sample standard deviation over the seeds), {meta['machine']}; trained {meta['jobs']} "
        f"job(s) side by side with {meta['threads']} thread(s) each; s/iter: "
        + (
            f"{meta['timing_iters']} iterations of each row alone, all cores."
            if meta["timing_iters"]
            else "measured during training."
        ),
        "",
        "| | deformable conv | modulation | RoI pooling | mimicking | box AP | AP50 | AP75 | box AP per seed | s/iter |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, _, stages, modulated, pool, mimic in rows:
        e = summary[name]
        per_seed = ", ".join(
            f"{status[(name, s)]['ap']:.3f}"
            if status[(name, s)].get("state") == "done"
            else "failed"
            if "failed" in status[(name, s)].get("state", "")
            else "-"
            for s in seeds
        )
        t = timing.get(name)
        if t is None:
            jobs = [status[(name, s)].get("s_per_iter_jobs") for s in seeds]
            jobs = [j for j in jobs if j]
            t = statistics.median(jobs) if jobs else None
        spi = "n/a" if t is None else f"{t:.2f}"
        lines.append(
            f"| {LABELS[name]} | {stages or '-'} | {check[modulated]} | {pool} | {check.get(mimic, mimic)} | "
            f"{_fmt(e, 'ap')} | {_fmt(e, 'ap50')} | {_fmt(e, 'ap75')} | {per_seed} | {spi} |"
        )
    verdicts = step_verdicts(rows, summary)
    if verdicts:
        lines += [
            "",
            "| step | change of mean box AP | sum of the two stds | larger than the spread? | "
            "change per seed (paired) | same sign in every seed? |",
            "|---|---|---|---|---|---|",
        ]
        for v in verdicts:
            verdict = {True: "**yes**", False: "no", None: "n/a (one seed)"}[v["larger"]]
            paired = ", ".join(f"{d:+.3f}" for d in v["paired"]) or "-"
            sign = "**yes**" if v["same_sign"] else ("no" if len(v["paired"]) > 1 else "n/a")
            lines.append(
                f"| {LABELS[v['frm']]} -> {LABELS[v['to']]} | {v['delta']:+.3f} | {v['spread']:.3f} | "
                f"{verdict} | {paired} | {sign} |"
            )
    return "\n".join(lines) + "\n", summary, verdicts


def plot(rows, summary, timing, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r[0] for r in rows if summary[r[0]]["n"]]
    if not done:
        return
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw=dict(width_ratios=[3, 1.4]))
    width = 0.27
    for i, (key, label) in enumerate(KEYS):
        xs = [j + (i - 1) * width for j in range(len(done))]
        means = [summary[n][key + "_mean"] for n in done]
        errs = [summary[n][key + "_std"] or 0.0 for n in done]
        bars = ax.bar(xs, means, width, yerr=errs, capsize=3, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
        for x, n in zip(xs, done):  # every seed as a dot
            ax.plot([x] * len(summary[n][key]), summary[n][key], "k.", ms=3)
    ax.set_xticks(range(len(done)), [LABELS[n] for n in done], rotation=20, ha="right")
    ax.set_ylabel("COCO metric (val), mean ± std over seeds")
    ax.set_title("Ablation on the embedded dataset (dots: single seeds)")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="lower center", ncol=3, fontsize=8, framealpha=0.9)
    bars = bx.bar(range(len(done)), [timing.get(n) or 0 for n in done], color="gray")
    bx.bar_label(bars, fmt="%.2f", fontsize=7)
    bx.set_xticks(range(len(done)), [LABELS[n] for n in done], rotation=20, ha="right")
    bx.set_ylabel("seconds per training iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(out, rows, seeds, status, timing, meta):
    table, summary, verdicts = markdown(rows, seeds, status, timing, meta)
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(table)
    runs = {
        f"{n}/seed{s}": dict(row=n, seed=s, **{k: v for k, v in st.items() if k != "log"})
        for (n, s), st in status.items()
    }
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(
            dict(
                meta=meta,
                seeds=seeds,
                timing=timing,
                summary=summary,
                steps=verdicts,
                runs=runs,
                configs={r[0]: r[1] for r in rows},
            ),
            f,
            indent=1,
        )
    plot(rows, summary, timing, os.path.join(out, "ablation.png"))
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--rows",
        default=",".join(DEFAULT_ROWS),
        help="comma-separated rows (default: the paper's six; also: mimic-large)",
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; every row is trained once per seed")
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the configs')")
    p.add_argument("--jobs", type=int, default=1, help="trainings side by side")
    p.add_argument("--data", default="data/shapes")
    p.add_argument("--out", default=None, help="results folder; must not exist (default results/ablation-<time>)")
    p.add_argument("--poll", type=float, default=30.0, help="seconds between progress lines")
    p.add_argument("--timing-iters", type=int, default=30, help="iterations of the timing run per row (0: none)")
    p.add_argument(
        "--reuse",
        action="append",
        default=None,
        help="an earlier results folder (may be given more than once): its finished runs are not retrained",
    )
    a = p.parse_args(argv)
    names = [n.strip() for n in a.rows.split(",") if n.strip()]
    known = [r[0] for r in ROWS]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        sys.exit(f"--rows: unknown {unknown or 'empty'}; choose from {', '.join(known)}")
    try:
        seeds = [int(v) for v in a.seeds.split(",") if v.strip()]
    except ValueError:
        sys.exit(f"--seeds must be comma-separated integers, got {a.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        sys.exit(f"--seeds must name at least one seed, each once, got {a.seeds!r}")
    if a.jobs < 1:
        sys.exit("--jobs must be >= 1")
    rows = [r for r in ROWS if r[0] in names]
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    from mmdcnv2.datasets import make_shapes_dataset

    out = a.out or os.path.join("results", time.strftime("ablation-%Y%m%d-%H%M%S"))
    if os.path.exists(out):
        sys.exit(f"{out} exists: choose a new --out (nothing is overwritten)")
    earlier_runs, earlier_meta, earlier_timing = {}, {}, {}
    for folder in a.reuse or []:  # later folders win
        with open(os.path.join(folder, "ablation.json")) as f:
            earlier_json = json.load(f)
        earlier_runs.update({k: dict(v, reused_from=folder) for k, v in earlier_json.get("runs", {}).items()})
        earlier_meta.update(earlier_json.get("meta", {}))
        earlier_timing.update({k: v for k, v in earlier_json.get("timing", {}).items() if v})
    if os.path.exists(os.path.join(a.data, "annotations", "train.json")):
        print("dataset:", a.data, flush=True)
    else:
        make_shapes_dataset(a.data)
    os.makedirs(out)
    jobs = min(a.jobs, len(rows) * len(seeds))
    threads = max(1, (os.cpu_count() or 1) // jobs)
    # seed-major order: every row gets its first seed before any row gets its second
    order = [(row, seed) for seed in seeds for row in rows]
    status = {(row[0], seed): {} for row, seed in order}
    timing = {}
    for row, seed in order:
        prev = earlier_runs.get(f"{row[0]}/seed{seed}", {})
        if prev.get("state") == "done":
            status[(row[0], seed)] = {k: v for k, v in prev.items() if k not in ("row", "seed")}
            print(f"{row[0]} seed {seed}: reusing the result in {prev['reused_from']}", flush=True)
    for row in rows:
        if earlier_timing.get(row[0]) and all(status[(row[0], s)].get("state") == "done" for s in seeds):
            timing[row[0]] = earlier_timing[row[0]]
    pending = [(row, seed) for row, seed in order if status[(row[0], seed)].get("state") != "done"]
    trained = bool(pending)
    meta = dict(
        iters=a.iters or "the configs'",
        jobs=jobs,
        threads=threads,
        timing_iters=a.timing_iters,
        machine=f"{os.cpu_count()}-core {platform.machine()} CPU",
        date=time.strftime("%Y-%m-%d"),
    )
    if not trained:  # every run came from --reuse: keep how they were trained
        meta.update({k: earlier_meta[k] for k in ("iters", "jobs", "threads", "date") if k in earlier_meta})
    if timing and not a.timing_iters and earlier_meta.get("timing_iters"):  # the timings came from earlier runs
        meta["timing_iters"] = earlier_meta["timing_iters"]
    running = []
    t0 = time.time()
    print(
        f"{len(rows)} rows x {len(seeds)} seeds, {len(pending)} to train, {jobs} at a time, {threads} "
        f"thread(s) each; results in {out}",
        flush=True,
    )
    finished = 0
    while pending or running:
        running = [t for t in running if t.is_alive()]
        while pending and len(running) < jobs:
            row, seed = pending.pop(0)
            t = threading.Thread(target=run_job, args=(row, seed, out, a.data, a.iters, threads, status), daemon=True)
            t.start()
            running.append(t)
        if running:
            for t in running:
                t.join(timeout=a.poll / max(1, len(running)))
            print(f"[{(time.time() - t0) / 60:5.1f} min] {progress_line(status)}", flush=True)
        now_done = sum(st.get("state") == "done" for st in status.values())
        if now_done != finished:  # partial results survive an interrupted run
            finished = now_done
            write_results(out, rows, seeds, status, timing, dict(meta, minutes=(time.time() - t0) / 60))
    if a.timing_iters > 0:
        for row in rows:
            if row[0] not in timing and any(status[(row[0], s)].get("state") == "done" for s in seeds):
                print(f"timing {row[0]}: {a.timing_iters} iterations alone", flush=True)
                time_row(row, out, a.data, a.timing_iters, timing)
    meta["minutes"] = (time.time() - t0) / 60
    table = write_results(out, rows, seeds, status, timing, meta)
    print("\n" + table)
    print(f"written: {out}/ablation.md, ablation.json, ablation.png ({meta['minutes']:.1f} min)")
    failed = [f"{n}/seed{s}" for (n, s), st in status.items() if st.get("state") != "done"]
    if failed:
        sys.exit(f"runs that did not finish: {', '.join(failed)} (see their logs under {out}/work)")


if __name__ == "__main__":
    main()
