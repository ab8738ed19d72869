"""Training-loop parts: hooks registered in ``mmdcnv2.registry.HOOKS``, the all-or-nothing
checkpoint file backend (``backend='atomic_local'``) and the CPU multi-process set-up that
``tools/dist_train.py`` uses."""

from .atomic_backend import ATOMIC_BACKEND, AtomicLocalBackend
from .distributed import LaunchError, RankLogRunner, configure_cpu_ddp, init_gloo, launch_env
from .hooks import MimicHook, SyncNormStatsHook, WorldSizeError, WorldSizeHook

__all__ = [
    "ATOMIC_BACKEND",
    "AtomicLocalBackend",
    "LaunchError",
    "MimicHook",
    "RankLogRunner",
    "SyncNormStatsHook",
    "WorldSizeError",
    "WorldSizeHook",
    "configure_cpu_ddp",
    "init_gloo",
    "launch_env",
]
