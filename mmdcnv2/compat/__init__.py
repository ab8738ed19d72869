"""Fixes for the stack we run on; applied on ``import mmdcnv2`` when mmdet is installed."""
from .checkpoint import allow_mmengine_checkpoints

allow_mmengine_checkpoints()

__all__ = ["allow_mmengine_checkpoints"]
