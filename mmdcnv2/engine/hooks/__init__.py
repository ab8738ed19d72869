from .mimic_hook import MimicHook

__all__ = ["MimicHook"]
