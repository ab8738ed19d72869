"""Multi-process training on CPUs (gloo) with mmengine's own Runner, without patching mmengine.

mmengine 0.10.7's ``pytorch`` launcher calls ``torch.cuda.set_device`` and its Runner gives
``MMDistributedDataParallel`` ``device_ids=[LOCAL_RANK]``: neither works without a GPU. But the
Runner skips its own ``init_dist`` when a process group already exists, and the values of
``model_wrapper_cfg`` override its default arguments. So a CPU launcher

1. reads and checks the variables that ``torchrun`` sets (:func:`launch_env`),
2. creates the gloo process group itself, with a timeout (:func:`init_gloo`),
3. asks for ``MMDistributedDataParallel`` with ``device_ids=None`` (:func:`configure_cpu_ddp`),
4. builds mmengine's Runner from the config (:class:`RankLogRunner`: every rank keeps a log).

``tools/dist_train.py`` is that launcher.
"""

import datetime
import os
import re
from typing import Optional

from mmengine.config import Config
from mmengine.runner import Runner

from .atomic_backend import ATOMIC_BACKEND

#: the variables torchrun (and mmengine's ``pytorch`` launcher) set for every process
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(RuntimeError):
    """The processes of a distributed job could not be started or could not meet."""


def _int_var(name: str, value: Optional[str]) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise LaunchError(f"environment variable {name} must be an integer, got {value!r}") from None


def launch_env(environ=None) -> dict:
    """The rank, world size and rendezvous address of this process, checked.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` (required) and
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (optional), as torchrun sets them. Raises
    :class:`LaunchError` naming the variable when one is missing or inconsistent.
    """
    env = os.environ if environ is None else environ
    missing = [k for k in LAUNCH_VARS if k not in env]
    if missing:
        raise LaunchError(
            f"environment variable(s) {', '.join(missing)} not set: start this script with torchrun, "
            "e.g. `torchrun --nproc-per-node 2 tools/dist_train.py CONFIG`"
        )
    rank, world_size = _int_var("RANK", env["RANK"]), _int_var("WORLD_SIZE", env["WORLD_SIZE"])
    if world_size < 1:
        raise LaunchError(f"WORLD_SIZE must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise LaunchError(f"RANK must be in [0, WORLD_SIZE={world_size}), got {rank}")
    local_world_size = _int_var("LOCAL_WORLD_SIZE", env.get("LOCAL_WORLD_SIZE", str(world_size)))
    local_rank = _int_var("LOCAL_RANK", env.get("LOCAL_RANK", str(rank)))
    if not 0 <= local_rank < local_world_size <= world_size:
        raise LaunchError(
            f"need 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE <= WORLD_SIZE, got LOCAL_RANK={local_rank}, "
            f"LOCAL_WORLD_SIZE={local_world_size}, WORLD_SIZE={world_size}"
        )
    port = _int_var("MASTER_PORT", env["MASTER_PORT"])
    if not 0 < port < 65536:
        raise LaunchError(f"MASTER_PORT must be in [1, 65535], got {port}")
    return dict(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        master_addr=env["MASTER_ADDR"],
        master_port=port,
    )


def init_gloo(timeout_s: float, environ=None) -> dict:
    """Creates the default process group (gloo, rendezvous from the environment).

    ``timeout_s`` bounds the wait for the other processes, at the start and in every
    collective later on (a rank that died or hangs makes the others fail instead of
    waiting forever). Failures to meet raise :class:`LaunchError` that says what went wrong.
    Returns :func:`launch_env`'s dict.
    """
    import torch.distributed as dist

    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    info = launch_env(environ)
    if dist.is_initialized():
        raise LaunchError("a default process group exists already")
    where = f"MASTER_ADDR:MASTER_PORT={info['master_addr']}:{info['master_port']}"
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    except dist.DistError as e:
        msg = str(e)
        joined = re.search(r"(\d+)/(\d+) clients joined", msg)
        if joined:
            raise LaunchError(
                f"only {joined.group(1)} of WORLD_SIZE={info['world_size']} processes joined at {where} "
                f"within {timeout_s:g} s: start WORLD_SIZE processes in all (torchrun "
                "--nproc-per-node/--nnodes) or fix WORLD_SIZE"
            ) from e
        if "EADDRINUSE" in msg or "address already in use" in msg:
            raise LaunchError(
                f"{where}: the port is in use by another program; choose a free port "
                "(torchrun --master-port / --rdzv-endpoint)"
            ) from e
        if "timed out" in msg and "connect" in msg:
            raise LaunchError(
                f"rank {info['rank']} could not reach rank 0 at {where} within {timeout_s:g} s: "
                "is rank 0 running, and is the address reachable from this machine?"
            ) from e
        raise LaunchError(
            f"rank {info['rank']} of {info['world_size']} could not join the process group at "
            f"{where}: {msg.splitlines()[0] if msg else type(e).__name__}"
        ) from e
    if dist.get_world_size() != info["world_size"] or dist.get_rank() != info["rank"]:
        raise LaunchError(
            f"the process group has rank {dist.get_rank()} of {dist.get_world_size()}, the "
            f"environment says RANK={info['rank']} of WORLD_SIZE={info['world_size']}"
        )
    return info


def configure_cpu_ddp(cfg: Config, timeout_s: Optional[float] = None) -> Config:
    """Sets ``cfg`` up for mmengine's Runner in a gloo process group on CPUs (in place).

    Refuses configs with synchronised BN (``norm_cfg=dict(type='SyncBN')``, ``sync_bn=...``):
    torch's SyncBatchNorm runs on GPUs only.

    * ``launcher='pytorch'`` (the Runner is distributed; it does not call ``init_dist``
      because :func:`init_gloo` created the group);
    * ``model_wrapper_cfg``: ``MMDistributedDataParallel`` with ``device_ids=None`` and
      ``find_unused_parameters`` from the config (default False, mmengine's default); other
      keys of the config's own ``model_wrapper_cfg`` are kept;
    * ``env_cfg.dist_cfg``: gloo and the timeout (for the record: the group exists already);
    * ``mmdcnv2.SyncNormStatsHook`` in ``custom_hooks``: BN statistics averaged over the
      processes after every iteration, so that every rank validates with the checkpoint's model;
    * ``mmdcnv2.WorldSizeHook``: checkpoints say how many processes wrote them, and resuming one
      with another number is refused (a new run from its weights, ``load_from``, is the way);
    * checkpoints written through the all-or-nothing ``atomic_local`` file backend, unless
      the checkpoint hook names a backend itself.
    """
    sync_bn = sorted(set(_sync_bn_types(cfg.get("model"))))
    if cfg.get("sync_bn") or sync_bn:
        what = f"sync_bn={cfg.get('sync_bn')!r}" if cfg.get("sync_bn") else f"norm_cfg type {', '.join(sync_bn)}"
        raise ValueError(
            f"the config asks for synchronised BN ({what}), which runs on GPUs only (torch's "
            "SyncBatchNorm refuses CPU tensors): use type='BN' for CPU training (the BN statistics are "
            "averaged over the processes after every iteration)"
        )
    cfg.launcher = "pytorch"
    wrapper = dict(cfg.get("model_wrapper_cfg") or {})
    wrapper_type = wrapper.setdefault("type", "MMDistributedDataParallel")
    if wrapper_type not in ("MMDistributedDataParallel", "mmengine.MMDistributedDataParallel"):
        raise ValueError(
            f"model_wrapper_cfg.type must be MMDistributedDataParallel for CPU training, got {wrapper_type!r}"
        )
    wrapper["device_ids"] = None
    wrapper["output_device"] = None
    wrapper.setdefault("broadcast_buffers", False)  # as mmengine's own default wrapper
    wrapper.setdefault("find_unused_parameters", bool(cfg.get("find_unused_parameters", False)))
    cfg.model_wrapper_cfg = wrapper
    env_cfg = cfg.get("env_cfg") or {}
    env_cfg["dist_cfg"] = dict(backend="gloo", **({} if timeout_s is None else dict(timeout=timeout_s)))
    cfg.env_cfg = env_cfg
    hooks = list(cfg.get("custom_hooks") or [])
    added = (dict(type="mmdcnv2.SyncNormStatsHook"), dict(type="mmdcnv2.WorldSizeHook", resume=bool(cfg.get("resume"))))
    for hook in added:
        if not any(h.get("type") in (hook["type"], hook["type"].split(".")[1]) for h in hooks):
            hooks.append(hook)
    cfg.custom_hooks = hooks
    ckpt = (cfg.get("default_hooks") or {}).get("checkpoint")
    if ckpt is not None and not ckpt.get("backend_args") and not ckpt.get("file_client_args"):
        ckpt["backend_args"] = dict(backend=ATOMIC_BACKEND)
    return cfg


def _sync_bn_types(node):
    """The SyncBN-like layer types named anywhere in a model config."""
    if isinstance(node, dict):
        kind = node.get("type")
        if isinstance(kind, str) and "syncbn" in kind.lower().replace("_", ""):
            yield kind
        for value in node.values():
            yield from _sync_bn_types(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _sync_bn_types(value)


class RankLogRunner(Runner):
    """mmengine's Runner whose logger keeps a file for every rank, not only rank 0's.

    mmengine's ``MMLogger(distributed=True)`` names them ``<time>_<host>_device<i>_rank<r>.log``
    in the run's log directory.
    """

    def build_logger(self, log_level="INFO", log_file=None, **kwargs):
        kwargs.setdefault("distributed", True)
        return super().build_logger(log_level=log_level, log_file=log_file, **kwargs)
