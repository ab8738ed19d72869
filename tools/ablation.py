"""The DCNv2 ablation on the embedded data, in the layout of the paper's table, with paired statistics.

    python tools/ablation.py [--hard] [--jobs 2] [--seeds 0,1,2,3,4] [--iters N] [--rows regular,dcnv1,...]
                             [--out DIR] [--reuse DIR ...]

Trains every row once per seed with `mim train` (same schedule: configs/shapes/_base_shapes.py,
the backbone from the pretrained checkpoint; `randomness.seed` = the seed), evaluates each with
`mim test` (COCO box AP, AP50, AP75 and AP per object size, by pycocotools on the validation
split), and writes DIR/ablation.md, DIR/ablation.json and DIR/ablation.png:

- per row: mean ± sample standard deviation over the seeds, and every seed's AP;
- per step (each row against the row above it, then the first row against each later row that is
  not next to it): the paired change per seed (a seed fixes the image order and the heads'
  initialisation in every row), its mean and a 95% confidence interval (Student's t, n - 1
  degrees of freedom), for every metric;
- the plot: each row's mean with its 95% interval and a dot per seed, and each step's paired
  change with its interval.

Default DIR: results/ablation-<time>, never one that exists; work dirs inside it
(work/<row>/seed<k>). The files are rewritten after every finished run, so an interrupted run
leaves what it had. --reuse DIR (repeatable) takes the finished runs of earlier folders instead of
training them again: to resume after a stop, run the same command with --reuse of the last folder.
Rows:

  regular      regular convolution, RoIAlign
  dcnv1        deformable conv in c5, deformable RoI pooling (DCNv1)
  dconv-c3-c5  deformable conv in c3-c5, deformable RoI pooling
  mdconv       + modulation in the convolutions
  mdpool       + modulated deformable RoI pooling (= the main job's detector)
  mimic        + R-CNN feature mimicking (DCNv2), 8 positive RoIs per image, 64px crops
  mimic-large  the same with 16 RoIs and 80px crops (closer to the paper's 32 and 224px)
  dcnv2        mdconv c3-c5 + mdpool (the mdpool row's config, named for the step from dconv c3-c5)

Without --hard: rows regular, dcnv1, dconv-c3-c5, mdconv, mdpool, mimic on data/shapes, seeds 0,1,2.
--hard: the harder split (data/shapes-hard, written by `tools/make_shapes.py --hard` or here), rows
regular, dcnv1, dconv-c3-c5, dcnv2, mimic-large, seeds 0-4.

--jobs N trains N runs side by side, each with cores/N threads (two at a time on a 2-core
machine halve the wall time; --threads sets the threads per run instead); runs go seed by seed
(every row's first seed first). The time per iteration in the table is measured afterwards, one
row at a time with all cores, over a short run of --timing-iters iterations (median of the logged
windows after the first): side-by-side jobs, or anything else running on the machine, would skew it.
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
    coco_metric_dict,
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
    # the same detector as mdpool, under the name of the step from dconv c3-c5 (--hard)
    ("dcnv2", S + "faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py", "c3-c5", True, "mdpool", False),
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
HARD_ROWS = ("regular", "dcnv1", "dconv-c3-c5", "dcnv2", "mimic-large")
HARD_SEEDS = "0,1,2,3,4"
LABELS = {
    "regular": "regular conv",
    "dcnv1": "DCNv1",
    "dconv-c3-c5": "dconv c3-c5",
    "mdconv": "+ modulation",
    "mdpool": "+ mdpool",
    "mimic": "+ mimicking (DCNv2)",
    "mimic-large": "+ mimicking, 16 RoIs, 80px",
    "dcnv2": "DCNv2 (mdconv c3-c5 + mdpool)",
}


def machine_name():
    """'<n>-core <CPU model>' from /proc/cpuinfo (the platform's name where it has none)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{os.cpu_count()}-core {model}"


def run_job(row, seed, out_dir, data, iters, threads, status):
    """Trains and evaluates one (row, seed) pair; its result goes to status[(row name, seed)]."""
    name, config = row[0], row[1]
    key = (name, seed)
    work = os.path.join(out_dir, "work", name, f"seed{seed}")
    os.makedirs(work)
    # no validation inside the training run (mmengine's loop validates at the last iteration whatever
    # the interval): `mim test` below evaluates the final checkpoint once
    options = data_options(data, iters) + [f"randomness.seed={seed}", "train_cfg.val_begin=1000000000"]
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
        metrics = coco_metric_dict(f.read())
    if rc != 0 or metrics is None:
        status[key] = dict(state=f"testing failed (rc {rc}): {test_log}")
        return
    status[key] = dict(
        state="done",
        **metrics,
        s_per_iter_jobs=seconds_per_iter(work),
        minutes=(time.time() - t0) / 60,
        checkpoint=ckpt,
        machine=machine_name(),
        date=time.strftime("%Y-%m-%d"),
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


KEYS = (
    ("ap", "box AP"),
    ("ap50", "AP50"),
    ("ap75", "AP75"),
    ("ap_s", "AP small"),
    ("ap_m", "AP medium"),
    ("ap_l", "AP large"),
)


def t_quantile(n):
    """The 97.5% quantile of Student's t with n - 1 degrees of freedom (n >= 2)."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def mean_ci(values):
    """(mean, half width of the 95% confidence interval of the mean) of ``values``; the half
    width is None for fewer than two values."""
    if not values:
        return None, None
    m = statistics.mean(values)
    if len(values) < 2:
        return m, None
    return m, t_quantile(len(values)) * statistics.stdev(values) / len(values) ** 0.5


def summarize(rows, seeds, status):
    """Per row and metric: the finished seeds' values, their mean, sample standard deviation and
    the half width of the 95% interval of the mean (None where undefined, e.g. AP large on a split
    without large objects)."""
    summary = {}
    for row in rows:
        done_seeds = [s for s in seeds if status[(row[0], s)].get("state") == "done"]
        done = [status[(row[0], s)] for s in done_seeds]
        entry = dict(n=len(done), seeds=done_seeds)
        for key, _ in KEYS:
            vals = [d.get(key) for d in done]
            entry[key] = vals
            defined = [v for v in vals if v is not None]
            entry[key + "_mean"], entry[key + "_ci"] = mean_ci(defined)
            entry[key + "_std"] = statistics.stdev(defined) if len(defined) > 1 else None
        summary[row[0]] = entry
    return summary


def step_pairs(rows):
    """The steps to report: each row against the row above it, then the first row against each
    later row that is not next to it (regular conv -> DCNv2, ...)."""
    pairs = list(zip(rows, rows[1:]))
    pairs += [(rows[0], row) for row in rows[2:]]
    return pairs


def step_stats(rows, summary):
    """For each step, per metric: the paired change per seed (the seeds both rows finished), its
    mean, the half width of its 95% interval, and whether the interval excludes zero."""
    out = []
    for prev, row in step_pairs(rows):
        a, b = summary[prev[0]], summary[row[0]]
        common = [s for s in a["seeds"] if s in b["seeds"]]
        if not common:
            continue
        step = dict(frm=prev[0], to=row[0], seeds=common, metrics={})
        for key, _ in KEYS:
            diffs = []
            for s in common:
                va, vb = a[key][a["seeds"].index(s)], b[key][b["seeds"].index(s)]
                if va is not None and vb is not None:
                    diffs.append(vb - va)
            mean, half = mean_ci(diffs)
            step["metrics"][key] = dict(
                paired=diffs,
                mean=mean,
                ci=half,
                low=None if half is None else mean - half,
                high=None if half is None else mean + half,
                excludes_zero=None if half is None else (mean - half > 0 or mean + half < 0),
            )
        out.append(step)
    return out


def _fmt(entry, key):
    if entry[key + "_mean"] is None:
        return "n/a" if entry["n"] else "-"
    if entry[key + "_std"] is None:
        return f"{entry[key + '_mean']:.3f}"
    return f"{entry[key + '_mean']:.3f} ± {entry[key + '_std']:.3f}"


def _fmt_change(m):
    if m["mean"] is None:
        return "n/a"
    if m["ci"] is None:
        return f"{m['mean']:+.3f}"
    text = f"{m['mean']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"
    return f"**{text}**" if m["excludes_zero"] else text


def step_label(step):
    return f"{LABELS[step['frm']]} -> {LABELS[step['to']]}"


def markdown(rows, seeds, status, timing, meta):
    check = {True: "yes", False: ""}
    summary = summarize(rows, seeds, status)
    lines = [
        f"{meta.get('data_label', 'Embedded shapes dataset')}, {meta['iters']} iterations, seeds "
        f"{', '.join(map(str, seeds))} (mean ± sample standard deviation over the seeds), {meta['machine']}; "
        f"trained {meta['jobs']} job(s) side by side with {meta['threads']} thread(s) each; s/iter: "
        + (
            f"{meta['timing_iters']} iterations of each row alone, all cores."
            if meta["timing_iters"]
            else "measured during training."
        ),
        "",
        "| | deformable conv | modulation | RoI pooling | mimicking | box AP | AP50 | AP75 | AP small | AP medium "
        "| AP large | box AP per seed | s/iter |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
        metrics = " | ".join(_fmt(e, key) for key, _ in KEYS)
        lines.append(
            f"| {LABELS[name]} | {stages or '-'} | {check[modulated]} | {pool} | {check.get(mimic, mimic)} | "
            f"{metrics} | {per_seed} | {spi} |"
        )
    steps = step_stats(rows, summary)
    if steps:
        lines += [
            "",
            "Paired change per step: the mean over the seeds both rows finished, with its 95% confidence "
            "interval (Student's t); **bold**: the interval excludes zero.",
            "",
            "| step | seeds | box AP change per seed | box AP | AP50 | AP75 | AP small | AP medium | AP large |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for st in steps:
            per_seed = ", ".join(f"{d:+.3f}" for d in st["metrics"]["ap"]["paired"]) or "-"
            changes = " | ".join(_fmt_change(st["metrics"][key]) for key, _ in KEYS)
            lines.append(f"| {step_label(st)} | {len(st['seeds'])} | {per_seed} | {changes} |")
    return "\n".join(lines) + "\n", summary, steps


def plot(rows, summary, steps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r[0] for r in rows if summary[r[0]]["n"]]
    if not done:
        return
    keys = [(k, label) for k, label in KEYS if any(summary[n][k + "_mean"] is not None for n in done)]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5), gridspec_kw=dict(width_ratios=[3, 2]))
    width = 0.8 / len(keys)
    for i, (key, label) in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(done))]
        means = [summary[n][key + "_mean"] or 0.0 for n in done]
        errs = [summary[n][key + "_ci"] or 0.0 for n in done]
        bars = ax.bar(xs, means, width, yerr=errs, capsize=2, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=2)
        for x, n in zip(xs, done):  # every seed as a dot
            vals = [v for v in summary[n][key] if v is not None]
            ax.plot([x] * len(vals), vals, "k.", ms=2.5)
    ax.set_xticks(range(len(done)), [LABELS[n] for n in done], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("COCO metric (val): mean, 95% interval, dots: seeds")
    ax.set_title("Rows")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="upper left", ncol=3, fontsize=7, framealpha=0.9)
    shown = [st for st in steps if st["metrics"]["ap"]["mean"] is not None]
    for i, st in enumerate(shown):
        for j, (key, color) in enumerate((("ap", "C0"), ("ap50", "C1"), ("ap75", "C2"))):
            m = st["metrics"][key]
            if m["mean"] is None:
                continue
            y = i + (j - 1) * 0.22
            bx.errorbar(
                m["mean"],
                y,
                xerr=m["ci"] or 0.0,
                fmt="o",
                color=color,
                capsize=3,
                ms=4,
                label=dict(KEYS)[key] if i == 0 else None,
            )
            bx.plot(m["paired"], [y] * len(m["paired"]), ".", color=color, ms=2.5, alpha=0.6)
    bx.axvline(0.0, color="gray", lw=0.8)
    bx.set_yticks(range(len(shown)), [step_label(st) for st in shown], fontsize=7)
    bx.invert_yaxis()
    bx.set_xlabel("paired change (later row - earlier row): mean, 95% interval, dots: seeds")
    bx.set_title("Steps")
    if shown:
        bx.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the steps' long labels stay whole
    plt.close(fig)


def write_results(out, rows, seeds, status, timing, meta):
    table, summary, steps = markdown(rows, seeds, status, timing, meta)
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
                steps=steps,
                runs=runs,
                configs={r[0]: r[1] for r in rows},
            ),
            f,
            indent=1,
        )
    plot(rows, summary, steps, os.path.join(out, "ablation.png"))
    return table


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--hard",
        action="store_true",
        help="the harder split (data/shapes-hard) with its rows and five seeds (see above)",
    )
    p.add_argument(
        "--rows",
        default=None,
        help="comma-separated rows (default: the paper's six, or with --hard: " + ",".join(HARD_ROWS) + ")",
    )
    p.add_argument(
        "--seeds",
        default=None,
        help=f"comma-separated seeds; every row is trained once per seed (default 0,1,2; --hard: {HARD_SEEDS})",
    )
    p.add_argument("--iters", type=int, default=None, help="training iterations (default: the configs')")
    p.add_argument("--jobs", type=int, default=1, help="trainings side by side")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads per training (default: cores / jobs); 1 with --jobs 1 leaves a core free for other work",
    )
    p.add_argument("--data", default=None, help="dataset folder (default data/shapes; --hard: data/shapes-hard)")
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
    variant = "hard" if a.hard else "default"
    a.rows = a.rows or ",".join(HARD_ROWS if a.hard else DEFAULT_ROWS)
    a.seeds = a.seeds or (HARD_SEEDS if a.hard else "0,1,2")
    a.data = a.data or ("data/shapes-hard" if a.hard else "data/shapes")
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
    if a.threads is not None and a.threads < 1:
        sys.exit("--threads must be >= 1")
    rows = [r for r in ROWS if r[0] in names]
    os.chdir(ROOT)
    sys.path.insert(0, ROOT)
    from mmdcnv2.datasets import make_shapes_dataset

    out = a.out or os.path.join("results", time.strftime("ablation-%Y%m%d-%H%M%S"))
    if os.path.exists(out):
        sys.exit(f"{out} exists: choose a new --out (nothing is overwritten)")
    for folder in a.reuse or []:
        if not os.path.exists(os.path.join(folder, "ablation.json")):
            sys.exit(f"--reuse {folder}: no ablation.json there")
    earlier_runs, earlier_meta, earlier_timing = {}, {}, {}
    for folder in a.reuse or []:  # later folders win
        with open(os.path.join(folder, "ablation.json")) as f:
            earlier_json = json.load(f)
        earlier_variant = earlier_json.get("meta", {}).get("variant", "default")
        if earlier_variant != variant:
            sys.exit(f"--reuse {folder}: its runs are on the {earlier_variant!r} split, this run's is {variant!r}")
        earlier_runs.update({k: dict(v, reused_from=folder) for k, v in earlier_json.get("runs", {}).items()})
        earlier_meta.update(earlier_json.get("meta", {}))
        earlier_timing.update({k: v for k, v in earlier_json.get("timing", {}).items() if v})
    stamp_path = os.path.join(a.data, "dataset.json")
    if os.path.exists(os.path.join(a.data, "annotations", "train.json")):
        stamp = json.load(open(stamp_path)) if os.path.exists(stamp_path) else {}
        found = stamp.get("variant", "default") if stamp else None
        if found is not None and found != variant:
            sys.exit(
                f"--data {a.data} holds the {found!r} split, this run asks for {variant!r}"
                + (" (drop --hard)" if a.hard else " (add --hard, or choose another --data)")
            )
        if found == variant:
            # reused as it is (its sizes may be the user's own), unless the variant's drawing settings changed
            # since it was written: then it is drawn again at its own sizes
            make_shapes_dataset(
                a.data,
                **{k: stamp[k] for k in ("num_train", "num_val", "size", "seed") if k in stamp},
                variant=variant,
            )
        print("dataset:", a.data, flush=True)
    else:
        make_shapes_dataset(a.data, variant=variant)
    with open(os.path.join(a.data, "annotations", "val.json")) as f:
        num_val = len(json.load(f)["images"])
    os.makedirs(out)
    jobs = min(a.jobs, len(rows) * len(seeds))
    threads = a.threads or max(1, (os.cpu_count() or 1) // jobs)
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
        machine=machine_name(),
        date=time.strftime("%Y-%m-%d"),
        variant=variant,
        data=a.data,
        num_val=num_val,
        data_label=(f"{'Harder' if a.hard else 'Embedded'} shapes split ({a.data}, {num_val} validation images)"),
    )
    if not trained:  # every run came from --reuse: keep how they were trained
        meta.update({k: earlier_meta[k] for k in ("iters", "jobs", "threads", "date") if k in earlier_meta})
    machines = {st["machine"] for st in status.values() if st.get("machine")}  # reused runs name theirs
    if trained:
        machines.add(meta["machine"])
    meta["machine"] = " and ".join(sorted(machines)) or meta["machine"]
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
