"""Training-loop parts registered in ``mmdcnv2.registry.HOOKS``."""
from .hooks import MimicHook

__all__ = ["MimicHook"]
