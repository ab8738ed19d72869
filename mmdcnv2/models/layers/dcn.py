"""Conv layers for ``build_conv_layer``: ``mmdcnv2.DCN`` (DCNv1) and ``mmdcnv2.DCNv2``.

They are the ops' Pack modules (same state-dict keys as mmcv's ``DCN``/``DCNv2``),
usable wherever mmcv builds a conv layer from a config: the stock mmdet ResNet's
``dcn=``, ``ConvModule(conv_cfg=...)``, necks and heads.
"""
import torch

from mmdcnv2.ops import DeformConv2dPack, DeformRoIPool, DeformRoIPoolPack, ModulatedDeformConv2dPack, \
    ModulatedDeformRoIPoolPack
from mmdcnv2.registry import MODELS


@MODELS.register_module("DCN")
class DCN(DeformConv2dPack):
    """DCNv1 layer: offsets from a zero-initialised ``conv_offset``. With those zero
    offsets it computes exactly the regular convolution of its weight."""


@MODELS.register_module("DCNv2")
class DCNv2(ModulatedDeformConv2dPack):
    """DCNv2 layer: offsets and modulation from a zero-initialised ``conv_offset``.

    At initialisation its modulation is sigmoid(0) = 0.5 everywhere. When it loads a
    checkpoint of a plain convolution (a ``weight`` without ``conv_offset``, such as an
    ImageNet ResNet), the weight is divided by that 0.5, so the layer starts as exactly
    that plain convolution. Checkpoints that hold ``conv_offset`` (mmdet's model zoo,
    our own) load unchanged.
    """

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        plain = prefix + "weight" in state_dict and prefix + "conv_offset.weight" not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if plain and not torch.any(self.conv_offset.weight):
            mask_bias = self.conv_offset.bias.chunk(3)[2]
            if torch.all(mask_bias == mask_bias[0]):
                with torch.no_grad():
                    self.weight.div_(torch.sigmoid(mask_bias[0]))


# The ops' classes themselves, for configs that name them (roi_layer=..., conv_cfg=...).
for _cls in (DeformConv2dPack, ModulatedDeformConv2dPack, DeformRoIPool, DeformRoIPoolPack,
             ModulatedDeformRoIPoolPack):
    MODELS.register_module(module=_cls)
