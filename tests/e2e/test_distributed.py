"""Multi-process training on the CPU (gloo) through tools/dist_train.py under torchrun.

Every run here is real: torchrun starts the processes, mmengine's Runner trains mmdet's
detector through MMDistributedDataParallel (find_unused_parameters=False, so a parameter
left without gradient on any rank fails the run), each process at one thread. The hooks in
ddp_helpers.py only observe (batches, logged values, files written, final parameters),
seed every iteration, or kill a process.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("mmdet")

import mmdcnv2  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from mmdcnv2.datasets import make_shapes_dataset  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DIST_TRAIN = os.path.join(ROOT, "tools", "dist_train.py")
MIMIC_CONFIG = os.path.join(ROOT, "configs", "shapes", "faster-rcnn_r18-dcnv2-mdpool-mimic_fpn_shapes.py")
MAIN_CONFIG = os.path.join(ROOT, "configs", "shapes", "faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py")
RUN_TIMEOUT = 400  # seconds for one torchrun job; a hang fails the test instead of blocking CI
ITERS = 3
# Train images in the order the processes get them (InfiniteSampler without shuffling: rank r
# of W trains image k * W + r at iteration k). 'gt': the image keeps its objects; 'empty': its
# annotations are removed, so it has no positive RoI at all (the mimicking branch has nothing
# to mimic). Iteration 0: both ranks have positives; 1: rank 0 has, rank 1 has none; 2: neither.
TRAIN_IMAGES = ["gt", "gt", "gt", "empty", "empty", "empty"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env():
    path = os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def torchrun(*args, nproc=2, launcher=None, timeout=RUN_TIMEOUT):
    """Runs ``torchrun <launcher options> tools/dist_train.py <args>``; returns (returncode, output)."""
    launcher = launcher if launcher is not None else ["--standalone", "--nproc-per-node", str(nproc)]
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, DIST_TRAIN, *map(str, args)]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout


def write_cfg(path, data, out_dir, *, iters=ITERS, accumulate=1, extra_hooks=(), save_initial=False, load_from=None):
    """A test config: the full DCNv2 detector of the shapes configs with feature mimicking,
    tiny images, one image per process and iteration, BN in eval mode (its statistics frozen:
    then the per-rank gradients average to exactly the gradient of the two batches), a constant
    learning rate, a checkpoint after every iteration."""
    hooks = [
        dict(type="mmdcnv2.MimicHook"),
        dict(type="SeedEveryIterHook"),
        dict(type="RecordHook", out_dir=out_dir, save_initial=save_initial),
        *extra_hooks,
    ]
    text = f"""
_base_ = {MIMIC_CONFIG!r}
custom_imports = dict(imports=["mmdcnv2", "ddp_helpers"], allow_failed_imports=False)
train_dataloader = dict(
    batch_size=1, num_workers=0, persistent_workers=False,
    sampler=dict(type="InfiniteSampler", shuffle=False),
    dataset=dict(
        data_root={data + "/"!r},
        filter_cfg=dict(filter_empty_gt=False, min_size=4),
        pipeline=[dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                  dict(type="Resize", scale=(64, 64), keep_ratio=True), dict(type="PackDetInputs")]))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
model = dict(backbone=dict(norm_eval=True))
train_cfg = dict(max_iters={iters}, val_interval=1000)
param_scheduler = [dict(type="ConstantLR", factor=1.0, by_epoch=False, begin=0, end=1000)]
optim_wrapper = dict(accumulative_counts={accumulate})
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=1, max_keep_ckpts=3))
custom_hooks = {list(hooks)!r}
load_from = {load_from!r}
"""
    with open(path, "w") as f:
        f.write(text)
    return path


def read_record(out_dir, rank):
    with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
        return json.load(f)


def params(out_dir, rank):
    return torch.load(os.path.join(out_dir, f"rank{rank}_params.pth"), map_location="cpu")


def assert_bit_identical(a, b, what):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[:3]}"


def ckpt_writes(record, work):
    """Checkpoint files (iter_*.pth, their .partial, last_checkpoint) this process opened for writing."""
    return [p for p in record["writes"] if os.path.abspath(p).startswith(os.path.abspath(work))]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes"))
    make_shapes_dataset(root, num_train=len(TRAIN_IMAGES), num_val=4, size=64, progress=None)
    ann = os.path.join(root, "annotations", "train.json")
    with open(ann) as f:
        coco = json.load(f)
    empty = {img["id"] for img, kind in zip(coco["images"], TRAIN_IMAGES) if kind == "empty"}
    assert all(any(a["image_id"] == img["id"] for a in coco["annotations"]) for img in coco["images"])
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] not in empty]
    with open(ann, "w") as f:
        json.dump(coco, f)
    return root


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory):
    """One process trained on all the batches (2 * ITERS iterations, gradients of 2 batches
    accumulated per step: mmengine's accumulative_counts=2), then 2 processes for ITERS
    iterations from the same initial weights."""
    tmp = tmp_path_factory.mktemp("ddp")
    ref_out, ddp_out = str(tmp / "ref_out"), str(tmp / "ddp_out")
    ref_cfg = Config.fromfile(
        write_cfg(str(tmp / "ref.py"), data, ref_out, iters=2 * ITERS, accumulate=2, save_initial=True)
    )
    for hook in ref_cfg.custom_hooks:
        if hook["type"] == "RecordHook":
            hook["audit_writes"] = False  # no audit hook in the pytest process
    ref_cfg.work_dir = str(tmp / "ref_work")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Runner.from_cfg(ref_cfg).train()
    finally:
        torch.set_num_threads(threads)
    cfg = write_cfg(str(tmp / "ddp.py"), data, ddp_out, load_from=os.path.join(ref_out, "initial.pth"))
    work = str(tmp / "ddp_work")
    t0 = time.time()
    rc, out = torchrun(cfg, "--work-dir", work, "--timeout", 120)
    assert rc == 0, out[-6000:]
    return dict(tmp=tmp, cfg=cfg, work=work, ref_out=ref_out, ddp_out=ddp_out, output=out, seconds=time.time() - t0)


def test_ddp_ranks_end_bit_identical(runs):
    assert "[dist_train rank 0/2] done" in runs["output"] and "[dist_train rank 1/2] done" in runs["output"]
    r0, r1 = read_record(runs["ddp_out"], 0), read_record(runs["ddp_out"], 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert [it["iter"] for it in r0["iters"]] == [it["iter"] for it in r1["iters"]] == [0, 1, 2]
    assert_bit_identical(params(runs["ddp_out"], 0), params(runs["ddp_out"], 1), "rank 0 vs rank 1")
    # and training moved every parameter, except the RoI pooling of the FPN levels that no RoI of
    # these tiny images maps to (zero gradient; AdamW's decay step rounds to no change) and what the
    # pretrained backbone's config freezes (stem, stage 1, every batch norm's affine parameters)
    initial = torch.load(os.path.join(runs["ref_out"], "initial.pth"), map_location="cpu")["state_dict"]
    final = params(runs["ddp_out"], 0)
    frozen = re.compile(r"backbone\.(conv1\.|bn1\.|layer1\.|layer\d\.\d+\.(bn\d|downsample\.1)\.)")
    still = [
        k for k, v in initial.items() if v.is_floating_point() and "running_" not in k and torch.equal(v, final[k])
    ]
    assert all(re.match(r"roi_head\.bbox_roi_extractor\.roi_layers\.[123]\.", k) or frozen.match(k) for k in still), (
        still
    )
    frozen_keys = [k for k, v in initial.items() if v.is_floating_point() and "running_" not in k and frozen.match(k)]
    assert frozen_keys and set(frozen_keys) <= set(still)
    assert any(k.startswith("backbone.layer4") and "conv_offset" in k for k in final)
    assert not any(k.startswith("backbone.layer4") and "conv_offset" in k for k in still)


def test_ddp_equals_one_process_on_both_batches(runs):
    """2 processes x 1 image per iteration == 1 process accumulating the same 2 images per step.

    DDP averages the ranks' gradients; each rank's loss is the mean over its own image's
    samples, so the step's gradient is (g(img_2k) + g(img_2k+1)) / 2, exactly what one
    process computes with mmengine's gradient accumulation over the two images (each loss
    divided by 2), with the same random numbers (SeedEveryIterHook) and BN statistics frozen.
    Tolerance: none. Both sides add the same two halves (a division by 2 is exact), so the
    parameters must agree bit for bit; a looser check would hide a missing or doubled gradient
    of any small parameter."""
    ref = read_record(runs["ref_out"], 0)
    r0, r1 = read_record(runs["ddp_out"], 0), read_record(runs["ddp_out"], 1)
    # the ranks trained disjoint halves of the data, in the one-process run's order
    ref_ids = [it["img_ids"][0] for it in ref["iters"]]
    assert len(set(ref_ids)) == len(TRAIN_IMAGES)
    ddp_ids = [ids for a, b in zip(r0["iters"], r1["iters"]) for ids in (a["img_ids"][0], b["img_ids"][0])]
    assert ddp_ids == ref_ids
    # same losses per image (same weights, same random numbers)
    ref_losses = [it["outputs"]["loss"] for it in ref["iters"]]
    ddp_losses = [it["outputs"]["loss"] for a, b in zip(r0["iters"], r1["iters"]) for it in (a, b)]
    assert ddp_losses == ref_losses
    assert_bit_identical(params(runs["ddp_out"], 0), params(runs["ref_out"], 0), "2 processes vs 1 process")


def test_ddp_mimic_branch_with_and_without_positives(runs):
    """Iteration 1: rank 0 mimics RoIs, rank 1 has no positive RoI; iteration 2: neither has.
    No hang, no error (find_unused_parameters=False: the classifier of the branch still gets a
    (zero) gradient), identical parameters (checked above)."""
    r0, r1 = read_record(runs["ddp_out"], 0), read_record(runs["ddp_out"], 1)
    rois = [[it["outputs"].get("mimic_rois", 0) for it in r["iters"]] for r in (r0, r1)]
    assert rois[0][0] > 0 and rois[1][0] > 0
    assert rois[0][1] > 0 and rois[1][1] == 0
    assert rois[0][2] == 0 and rois[1][2] == 0
    for r in (r0, r1):
        for it, n in zip(r["iters"], [it["outputs"].get("mimic_rois", 0) for it in r["iters"]]):
            assert (it["outputs"]["loss_mimic"] == 0) == (n == 0)


def test_ddp_checkpoints_rank0_only(runs):
    work = runs["work"]
    w0, w1 = ckpt_writes(read_record(runs["ddp_out"], 0), work), ckpt_writes(read_record(runs["ddp_out"], 1), work)
    assert w1 == [], f"rank 1 wrote {w1}"
    names = [os.path.basename(p) for p in w0]
    assert [n for n in names if n.endswith(".partial")] == [f"iter_{i}.pth.partial" for i in range(1, ITERS + 1)]
    assert names.count("last_checkpoint") == ITERS
    with open(os.path.join(work, "last_checkpoint")) as f:
        assert f.read().strip() == os.path.join(work, f"iter_{ITERS}.pth")
    assert not [n for n in os.listdir(work) if n.endswith(".partial")]
    ckpt = torch.load(os.path.join(work, f"iter_{ITERS}.pth"), map_location="cpu")
    assert ckpt["meta"]["iter"] == ITERS
    assert_bit_identical(ckpt["state_dict"], params(runs["ddp_out"], 0), "checkpoint vs rank 0's model")
    # every rank keeps its own training log
    logs = sorted(p for d, _, fs in os.walk(work) for p in (os.path.join(d, f) for f in fs) if p.endswith(".log"))
    assert [re.search(r"rank(\d+)\.log$", p).group(1) for p in logs] == ["0", "1"]
    for p in logs:
        with open(p) as f:
            assert len(re.findall(r"Iter\(train\) \[\s*\d+/3\]", f.read())) == ITERS


def torchrun_failures(out):
    """torchrun's failure report: {rank: exit code} over every process it lists, and the
    (rank, exit code) of the one it names as root cause."""
    entry = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")
    assert "Root Cause" in out, out[-3000:]
    listed, root = out[: out.index("Root Cause")], out[out.index("Root Cause") :]
    failures = {int(r): e for r, e in entry.findall(listed)}
    found = entry.findall(root)
    assert len(found) >= 1, out[-3000:]
    root_cause = (int(found[0][0]), found[0][1])
    failures.setdefault(*root_cause)
    return failures, root_cause


# case: (DieHook arguments, rank whose failure torchrun reports first and its exit code, the
# other rank's last words, the last complete checkpoint)
FAILURES = {
    # rank 1 SIGKILLed before the 3rd iteration: torchrun stops rank 0, or (on a loaded machine, where
    # torchrun's SIGTERM can come late) rank 0 finds its peer gone in the next collective first
    "rank1_killed": (
        dict(rank=1, iter=2, at="iter"),
        1,
        "-9",
        r"\[dist_train rank 0/2\] (stopped by SIGTERM|training failed: another process of this job died)",
        2,
    ),
    # rank 0 SIGKILLed while saving iter_2.pth, its data written but not renamed into place:
    # rank 1 is stopped by torchrun or finds its peer gone in the next collective
    "rank0_killed_saving": (
        dict(rank=0, iter=2, at="commit"),
        0,
        "-9",
        r"\[dist_train rank 1/2\] (stopped by SIGTERM|training failed: another process)",
        1,
    ),
    # rank 1 hangs (alive, never reaches the next collective): rank 0 gives up after --timeout
    "rank1_hangs": (
        dict(rank=1, iter=2, at="hang"),
        0,
        "1",
        r"\[dist_train rank 0/2\] training failed: another process did not answer within --timeout",
        2,
    ),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_distributed_rank_dies(runs, data, case):
    """A process killed or hanging mid-run: no hang; torchrun exits with an error naming the
    failed rank, the other process says why it stopped, and no checkpoint is presented as
    complete that is not. After rank 1's death, `--resume` in 2 processes continues from rank
    0's last checkpoint and ends exactly where the uninterrupted run ended; in 1 process it is
    refused (another batch per step)."""
    die, failed, exitcode, last_words, done = FAILURES[case]
    tmp = runs["tmp"] / case
    out_dir, work = str(tmp / "out"), str(tmp / "work")
    tmp.mkdir()
    init = os.path.join(runs["ref_out"], "initial.pth")
    cfg = write_cfg(str(tmp / "cfg.py"), data, out_dir, extra_hooks=[dict(type="DieHook", **die)], load_from=init)
    t0 = time.time()
    rc, out = torchrun(cfg, "--work-dir", work, "--timeout", 20 if case == "rank1_hangs" else 60)
    assert rc != 0
    assert time.time() - t0 < RUN_TIMEOUT
    failures, root_cause = torchrun_failures(out)
    assert failures.get(failed) == exitcode, out[-3000:]
    # torchrun names as root cause the failure with the earliest time, to the second: when the other
    # rank finds its peer gone within the same second, it may come first, with exit code 1
    # (a hanging rank is never the first to fail)
    allowed = [(failed, exitcode)] + ([(1 - failed, "1")] if exitcode == "-9" else [])
    assert root_cause in allowed, out[-3000:]
    assert re.search(last_words, out), out[-3000:]
    # the last complete checkpoint is the one last_checkpoint names; nothing later exists
    with open(os.path.join(work, "last_checkpoint")) as f:
        assert f.read().strip() == os.path.join(work, f"iter_{done}.pth")
    assert sorted(n for n in os.listdir(work) if n.startswith("iter_") and n.endswith(".pth")) == [
        f"iter_{i}.pth" for i in range(1, done + 1)
    ]
    assert torch.load(os.path.join(work, f"iter_{done}.pth"), map_location="cpu")["meta"]["iter"] == done
    if case == "rank0_killed_saving":  # killed with the file written but not renamed into place
        assert os.path.exists(os.path.join(work, "iter_2.pth.partial"))
    if case != "rank1_killed":
        return
    cfg = write_cfg(str(tmp / "cfg_resume.py"), data, out_dir, load_from=init)  # the same without DieHook
    # resuming with another number of processes is refused (the batch of a step would change)
    rc, out = torchrun(cfg, "--work-dir", work, "--resume", "--timeout", 60, nproc=1)
    assert rc != 0
    assert re.search(
        r"\[dist_train rank 0/1\] WorldSizeError: the checkpoint was written by a run of 2 processes "
        r"\(WORLD_SIZE=2\), this run has 1",
        out,
    ), out[-3000:]
    assert not [n for n in os.listdir(work) if n.startswith("iter_3")]
    with open(os.path.join(work, "last_checkpoint")) as f:
        assert f.read().strip() == os.path.join(work, "iter_2.pth")
    rc, out = torchrun(cfg, "--work-dir", work, "--resume", "--timeout", 60)
    assert rc == 0, out[-6000:]
    assert f"Load checkpoint from {os.path.join(work, 'iter_2.pth')}" in out and "resumed epoch: 0, iter: 2" in out
    r0 = read_record(out_dir, 0)
    assert [it["iter"] for it in r0["iters"]] == [ITERS - 1]  # only the missing iteration ran (0-based)
    assert_bit_identical(params(out_dir, 0), params(runs["ddp_out"], 0), "resumed vs uninterrupted")
    assert_bit_identical(params(out_dir, 1), params(runs["ddp_out"], 0), "resumed rank 1 vs uninterrupted")


def test_distributed_two_nodes_c10d(runs, data):
    """Two 'nodes' of one process each, meeting through torchrun's c10d rendezvous on 127.0.0.1."""
    tmp = runs["tmp"] / "nodes"
    tmp.mkdir()
    out_dir, work = str(tmp / "out"), str(tmp / "work")
    cfg = write_cfg(str(tmp / "cfg.py"), data, out_dir, iters=2, load_from=os.path.join(runs["ref_out"], "initial.pth"))
    port = free_port()
    procs = []
    for node in (0, 1):
        launcher = [
            "--nnodes",
            "2",
            "--node-rank",
            str(node),
            "--nproc-per-node",
            "1",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            "mmdcnv2-test",
        ]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            *launcher,
            DIST_TRAIN,
            cfg,
            "--work-dir",
            work,
            "--timeout",
            "120",
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=RUN_TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    r0, r1 = read_record(out_dir, 0), read_record(out_dir, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    # each node trained its own half of the images
    seen = [set(ids for it in r["iters"] for ids in it["img_ids"]) for r in (r0, r1)]
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == 2
    assert_bit_identical(params(out_dir, 0), params(out_dir, 1), "node 0 vs node 1")


def test_distributed_main_job_config_with_coco_evaluation(tmp_path):
    """The main job's config (tools/run_main.py's, with its own data options) in 2 processes:
    both ranks train and log, and the final validation is mmdet's CocoMetric over all the
    validation images, gathered from both ranks; it equals a one-process test of the final
    checkpoint. For the evaluation to see every image, the score threshold is 0 (a detector
    trained 4 iterations scores low) and validation runs one image per batch (so the two sides
    compute each image's detections identically)."""
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    try:
        from mim_jobs import data_options
        from run_main import DEFAULT_CONFIG
    finally:
        sys.path.remove(os.path.join(ROOT, "tools"))
    assert os.path.join(ROOT, DEFAULT_CONFIG) == MAIN_CONFIG
    data = str(tmp_path / "shapes")
    make_shapes_dataset(data, num_train=8, num_val=6, size=96, progress=None)
    work, test_work = str(tmp_path / "work"), str(tmp_path / "test")
    iters = 4
    evaluation = ["model.test_cfg.rcnn.score_thr=0.0", "val_dataloader.batch_size=1", "test_dataloader.batch_size=1"]
    options = data_options(data, iters) + evaluation + [f"val_evaluator.outfile_prefix={work}/dets"]
    rc, out = torchrun(MAIN_CONFIG, "--work-dir", work, "--timeout", 120, "--cfg-options", *options)
    assert rc == 0, out[-6000:]
    logs = sorted(p for d, _, fs in os.walk(work) for p in (os.path.join(d, f) for f in fs) if p.endswith(".log"))
    assert [re.search(r"rank(\d+)\.log$", p).group(1) for p in logs] == ["0", "1"]
    texts = []
    for p in logs:
        with open(p) as f:
            texts.append(f.read())
    for text in texts:
        assert re.search(rf"Iter\(train\) \[{iters}/{iters}\].*loss: [0-9.]+", text), text[-3000:]
    m = re.search(r"Iter\(val\) \[\d+/\d+\]\s+coco/bbox_mAP: ([0-9.]+)", texts[0])
    assert m, texts[0][-3000:]
    with open(f"{work}/dets.bbox.json") as f:
        ddp_dets = json.load(f)
    with open(os.path.join(data, "annotations", "val.json")) as f:
        val_ids = {img["id"] for img in json.load(f)["images"]}
    assert {d["image_id"] for d in ddp_dets} == val_ids  # both ranks' images are in the evaluation
    # the same checkpoint tested in one process with mmdet's CocoMetric
    cfg = Config.fromfile(MAIN_CONFIG)
    cfg.merge_from_dict(dict(o.split("=", 1) for o in data_options(data)))
    cfg.merge_from_dict(
        {
            "model.test_cfg.rcnn.score_thr": 0.0,
            "test_dataloader.batch_size": 1,
            "test_dataloader.num_workers": 0,
            "test_dataloader.persistent_workers": False,
            "test_evaluator.outfile_prefix": f"{test_work}/dets",
        }
    )
    cfg.work_dir = test_work
    cfg.load_from = os.path.join(work, f"iter_{iters}.pth")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        metrics = Runner.from_cfg(cfg).test()
    finally:
        torch.set_num_threads(threads)
    with open(f"{test_work}/dets.bbox.json") as f:
        one_dets = json.load(f)
    key = lambda d: (d["image_id"], d["category_id"], d["score"], d["bbox"])  # noqa: E731
    assert sorted(map(key, ddp_dets)) == sorted(map(key, one_dets))
    assert metrics["coco/bbox_mAP"] == float(m.group(1))


def test_distributed_bad_launch(tmp_path):
    """Started without torchrun, or with a world size larger than the processes started: one
    clear line, exit code 2, within the timeout. (The other checks of the launch variables are
    in tests/engine/test_distributed_setup.py.)"""
    env = subprocess_env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cases = [
        (
            {},
            r"\[dist_train\] LaunchError: environment variable\(s\) RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT not "
            r"set: start this script with torchrun",
        ),
        (
            dict(RANK="0", WORLD_SIZE="2"),
            r"\[dist_train rank 0/2\] LaunchError: only 1 of WORLD_SIZE=2 processes "
            r"joined at MASTER_ADDR:MASTER_PORT=127\.0\.0\.1:\d+ within 5 s",
        ),
    ]
    for extra, message in cases:
        case_env = dict(env, **extra)
        if extra:
            case_env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, DIST_TRAIN, MAIN_CONFIG, "--work-dir", str(tmp_path / "work"), "--timeout", "5"],
            cwd=ROOT,
            env=case_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2, (extra, proc.stdout[-2000:], proc.stderr[-2000:])
        assert re.search(message, proc.stderr), (extra, proc.stderr[-2000:])
        assert time.time() - t0 < 60
    assert not os.path.exists(str(tmp_path / "work"))


def test_distributed_port_in_use(tmp_path):
    """torchrun's rendezvous port is taken by another program: torchrun fails at once with a
    message naming the port, before any training process starts; nothing is written."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        work = str(tmp_path / "work")
        t0 = time.time()
        rc, out = torchrun(
            MAIN_CONFIG,
            "--work-dir",
            work,
            timeout=120,
            launcher=["--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)],
        )
    assert rc != 0 and time.time() - t0 < 120
    assert re.search(rf"port: {port}.*EADDRINUSE.*address already in use", out), out[-3000:]
    assert "[dist_train" not in out  # no training process was started
    assert not os.path.exists(work)


def test_distributed_work_dir_of_another_run_is_refused(runs):
    """Training again into a work dir that holds checkpoints needs --resume (nothing is overwritten)."""
    work = runs["work"]
    before = {n: os.path.getmtime(os.path.join(work, n)) for n in os.listdir(work)}
    rc, out = torchrun(runs["cfg"], "--work-dir", work, "--timeout", 30)
    assert rc != 0
    refused = f"FileExistsError: --work-dir {work} holds the checkpoints"
    assert f"[dist_train rank 0/2] {refused}" in out or f"[dist_train rank 1/2] {refused}" in out, out[-3000:]
    for rank in (0, 1):  # each rank refused, or was stopped by torchrun when the other one did
        assert f"[dist_train rank {rank}/2] {refused}" in out or f"[dist_train rank {rank}/2] stopped by SIGTERM" in out
    assert "process group up" not in out
    assert {n: os.path.getmtime(os.path.join(work, n)) for n in os.listdir(work)} == before
