"""The mmdet-level API: components registered in ``mmdcnv2.registry.MODELS``."""
from .backbones import DCNBasicBlock, DCNResNet, DCNResNeXt
from .layers import DCN, DCNv2
from .roi_extractors import DeformRoIExtractor

__all__ = ["DCN", "DCNv2", "DCNBasicBlock", "DCNResNet", "DCNResNeXt", "DeformRoIExtractor"]
