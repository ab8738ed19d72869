"""Multi-process training on CPUs: mmdet's training (mmengine's Runner) over gloo, started by torchrun.

    torchrun --nproc-per-node 2 tools/dist_train.py CONFIG [--work-dir DIR] [--resume [CKPT]]
             [--cfg-options KEY=VALUE ...] [--threads 1] [--timeout 1800]

Two machines ("nodes") of N processes each, started on both with the same rendezvous address
(the c10d rendezvous hands out the ranks):

    torchrun --nnodes 2 --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT \\
             --rdzv-id JOB tools/dist_train.py CONFIG ...

What it does, in every process: checks the variables torchrun sets, creates the gloo process
group (``--timeout`` bounds every wait for the other processes), sets the config up for
``MMDistributedDataParallel`` without device ids (mmengine's ``pytorch`` launcher needs GPUs),
builds mmengine's Runner from the config as mmdet's tools/train.py does and trains. The batch
size in the config is per process. Checkpoints are written by rank 0 only, all or nothing; every
rank writes its own log. Any failure ends with one line ``[dist_train rank R/N] ...`` on stderr.
For GPUs use mmdet's own launcher: ``mim train mmdet CONFIG --launcher pytorch --gpus N``.
"""

import argparse
import os
import os.path as osp
import signal
import sys
import traceback

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


class Stopped(BaseException):
    """SIGTERM: the launcher stops every process when one fails (or the job is cancelled)."""


def parse_args(argv=None):
    from mmengine.config import DictAction

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="training config file")
    p.add_argument(
        "--work-dir", help="where logs and checkpoints go (default: the config's, else work_dirs/<config name>)"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        type=str,
        const="auto",
        help="resume from CKPT, or without a value from the work dir's latest checkpoint",
    )
    p.add_argument(
        "--auto-scale-lr",
        action="store_true",
        help="scale the learning rate by (processes x batch size) / auto_scale_lr.base_batch_size",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument(
        "--timeout",
        type=float,
        default=1800.0,
        help="seconds a process waits for the others (start, every collective) before it fails (default 1800)",
    )
    p.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        help="override config settings, KEY=VALUE as in mmdet's tools/train.py",
    )
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error(f"--threads must be >= 1, got {a.threads}")
    if not a.timeout > 0:
        p.error(f"--timeout must be > 0, got {a.timeout}")
    if not osp.isfile(a.config):
        p.error(f"config file not found: {a.config}")
    return a


def build_cfg(a):
    from mmengine.config import Config

    from mmdcnv2.engine import configure_cpu_ddp

    cfg = Config.fromfile(a.config)
    if a.cfg_options:
        cfg.merge_from_dict(a.cfg_options)
    if a.work_dir:
        cfg.work_dir = a.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(a.config))[0])
    if a.auto_scale_lr:
        scale = cfg.get("auto_scale_lr") or {}
        if "base_batch_size" not in scale:
            raise ValueError("--auto-scale-lr needs auto_scale_lr.base_batch_size in the config")
        scale["enable"] = True
        cfg.auto_scale_lr = scale
    if a.resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif a.resume is not None:
        if not osp.isfile(a.resume):
            raise FileNotFoundError(f"--resume: no checkpoint file {a.resume}")
        cfg.resume, cfg.load_from = True, a.resume
    last = osp.join(cfg.work_dir, "last_checkpoint")
    if not cfg.get("resume") and osp.exists(last):
        raise FileExistsError(
            f"--work-dir {cfg.work_dir} holds the checkpoints of an earlier run ({last}): pass "
            "--resume to continue it, or choose a new --work-dir (nothing is overwritten)"
        )
    if cfg.get("resume") and a.resume == "auto" and not osp.exists(last):
        raise FileNotFoundError(f"--resume: no {last}: nothing to resume in --work-dir {cfg.work_dir}")
    configure_cpu_ddp(cfg, timeout_s=a.timeout)
    return cfg


def explain(exc, timeout):
    """One line that says what most likely happened."""
    text = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
    low = str(exc).lower()
    if any(s in low for s in ("connection closed by peer", "connection reset", "broken pipe", "connection refused")):
        return (
            "another process of this job died (its connection closed); see that rank's error and torchrun's "
            f"summary. ({text})"
        )
    if "timed out" in low or "timeout" in low:
        return f"another process did not answer within --timeout {timeout:g} s (died or hangs). ({text})"
    return text


def main(argv=None):
    # CPU training: keep CUDA out even on a machine with GPUs (mmengine then puts the model on the CPU)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    global _WHERE
    where = "[dist_train]"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        where = f"[dist_train rank {os.environ['RANK']}/{os.environ['WORLD_SIZE']}]"
    _WHERE = where
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return run(argv, where)
    except Stopped:  # the handler has said why
        return 128 + signal.SIGTERM
    finally:
        _MAIN_DONE.append(True)


def run(argv, where):
    a = parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    sys.path.insert(0, ROOT)  # the configs' custom_imports name mmdcnv2
    from mmdcnv2.engine import LaunchError, RankLogRunner, init_gloo, launch_env

    try:  # set-up: bad input fails here with one clear line, before any training
        launch_env()
        cfg = build_cfg(a)  # before meeting the others: every rank fails at once by itself
        init_gloo(a.timeout)
    except (LaunchError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"{where} {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"{where} process group up (gloo, {torch.get_num_threads()} thread(s)); work dir {cfg.work_dir}", flush=True)
    try:
        runner = RankLogRunner.from_cfg(cfg)
        runner.train()
    except LaunchError as e:  # e.g. resuming with another number of processes
        print(f"{where} {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        traceback.print_exc()
        print(f"{where} training failed: {explain(e, a.timeout)}", file=sys.stderr, flush=True)
        return 1
    import torch.distributed as dist

    dist.destroy_process_group()
    print(f"{where} done", flush=True)
    return 0


_WHERE = "[dist_train]"
_MAIN_DONE = []  # non-empty once main() has returned


def _on_sigterm(signum, frame):
    # Say why at once: the signal can arrive anywhere, also after main() returned (in atexit handlers),
    # where an exception would only print a traceback. Later SIGTERMs are ignored.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(
        f"{_WHERE} stopped by SIGTERM: the launcher stops every process when one of them fails (see the "
        "failing rank's error and torchrun's summary) or when the job is cancelled",
        file=sys.stderr,
        flush=True,
    )
    if _MAIN_DONE or sys.is_finalizing():
        return  # exiting already: nothing left to stop
    raise Stopped()


if __name__ == "__main__":
    code = main()
    if code:
        # A failed run leaves its process group broken (a peer dead or hanging): tearing it down with the
        # interpreter can abort the process (a communication thread still running, SIGABRT) and hide the exit
        # code that says why. The reason is printed and the logs flushed; leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
