from .dcn import DCN, DCNv2

__all__ = ["DCN", "DCNv2"]
