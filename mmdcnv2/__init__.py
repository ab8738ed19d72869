"""mmdcnv2: Deformable ConvNets v2 for mmdetection, on compiled CPU and CUDA ops.

``import mmdcnv2`` loads the ops (``mmdcnv2.ops``, usable from plain PyTorch).
"""
from . import ops  # noqa: F401

__version__ = "0.1.0"
