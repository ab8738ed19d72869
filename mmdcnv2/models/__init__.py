"""The mmdet-level API: components registered in ``mmdcnv2.registry.MODELS``."""

from .backbones import DCNBasicBlock, DCNResNet, DCNResNeXt
from .layers import DCN, DCNv2
from .mimic import CosineMimicLoss, MimicRCNN, RCNNMimicBranch
from .roi_extractors import DeformRoIExtractor

__all__ = [
    "CosineMimicLoss",
    "DCN",
    "DCNv2",
    "DCNBasicBlock",
    "DCNResNet",
    "DCNResNeXt",
    "DeformRoIExtractor",
    "MimicRCNN",
    "RCNNMimicBranch",
]
