"""Fixes for the stack we run on; applied on ``import mmdcnv2`` when mmdet is installed."""

from .checkpoint import allow_mmengine_checkpoints
from .config_package import register_config_package

allow_mmengine_checkpoints()
register_config_package()

__all__ = ["allow_mmengine_checkpoints", "register_config_package"]
