from .resnet import DCNBasicBlock, DCNResNet, DCNResNeXt

__all__ = ["DCNBasicBlock", "DCNResNet", "DCNResNeXt"]
