from .mimic_hook import MimicHook
from .sync_norm_stats_hook import SyncNormStatsHook

__all__ = ["MimicHook", "SyncNormStatsHook"]
