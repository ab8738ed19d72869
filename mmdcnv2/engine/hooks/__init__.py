from .deform_stats_hook import DeformStatsHook
from .mimic_hook import MimicHook
from .sync_norm_stats_hook import SyncNormStatsHook
from .world_size_hook import WorldSizeError, WorldSizeHook

__all__ = ["DeformStatsHook", "MimicHook", "SyncNormStatsHook", "WorldSizeError", "WorldSizeHook"]
