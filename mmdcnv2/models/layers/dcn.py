"""Conv layers for ``build_conv_layer``: ``mmdcnv2.DCN`` (DCNv1) and ``mmdcnv2.DCNv2``.

They are the ops' Pack modules (same state-dict keys as mmcv's ``DCN``/``DCNv2``),
usable wherever mmcv builds a conv layer from a config: the stock mmdet ResNet's
``dcn=``, ``ConvModule(conv_cfg=...)``, necks and heads.
"""

import torch

from mmdcnv2.ops import (
    DeformConv2dPack,
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformConv2dPack,
    ModulatedDeformRoIPoolPack,
)
from mmdcnv2.registry import MODELS


@MODELS.register_module("DCN")
class DCN(DeformConv2dPack):
    """DCNv1 conv layer for configs: ``type='mmdcnv2.DCN'``, our counterpart of mmcv's ``DCN``.

    :class:`mmdcnv2.ops.DeformConv2dPack` as a registered layer: offsets from a zero-initialised
    ``conv_offset``; with those zero offsets it computes exactly the regular convolution of its weight.
    Arguments (``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``,
    ``dilation``, ``groups``, ``deform_groups`` or mmcv's deprecated ``deformable_groups``, ``bias``
    which must be False), initialisation and state-dict keys (``weight``, ``conv_offset.weight``,
    ``conv_offset.bias``) are mmcv's, so mmdet's ``dcn`` model-zoo checkpoints load.

    Usage (mmcv's ``build_conv_layer`` passes the channels, kernel size, stride, padding, ...; from
    Python, in mmdet's default scope, as in a config run or after ``mmdet.utils.register_all_modules()``)::

        model = dict(backbone=dict(  # stock mmdet ResNet
            dcn=dict(type="mmdcnv2.DCN", deform_groups=1, fallback_on_stride=False),
            stage_with_dcn=(False, True, True, True)))
        ConvModule(256, 256, 3, padding=1, bias=False, conv_cfg=dict(type="mmdcnv2.DCN"))  # DCN has no bias
    """


@MODELS.register_module("DCNv2")
class DCNv2(ModulatedDeformConv2dPack):
    """DCNv2 conv layer for configs: ``type='mmdcnv2.DCNv2'``, our counterpart of mmcv's ``DCNv2``.

    :class:`mmdcnv2.ops.ModulatedDeformConv2dPack` as a registered layer: offsets and modulation from a
    zero-initialised ``conv_offset``. Arguments (``in_channels``, ``out_channels``, ``kernel_size``,
    ``stride``, ``padding``, ``dilation``, ``groups``, ``deform_groups`` or mmcv's deprecated
    ``deformable_groups``, ``bias``), initialisation and state-dict keys (``weight``, ``bias`` with
    ``bias``, ``conv_offset.weight``, ``conv_offset.bias``) are mmcv's, so mmdet's ``dcnv2`` model-zoo
    checkpoints load.

    At initialisation its modulation is sigmoid(0) = 0.5 everywhere. When it loads a
    checkpoint of a plain convolution (a ``weight`` without ``conv_offset``, such as an
    ImageNet ResNet), the weight is divided by that 0.5, so the layer starts as exactly
    that plain convolution. Checkpoints that hold ``conv_offset`` (mmdet's model zoo,
    our own) load unchanged. (Precisely: after loading such a ``weight``, while ``conv_offset``'s
    weight is all zero and the mask part of its bias is one value b, the weight is divided by
    sigmoid(b).)

    Usage (mmcv's ``build_conv_layer`` passes the channels, kernel size, stride, padding, ...; from
    Python, in mmdet's default scope, as in a config run or after ``mmdet.utils.register_all_modules()``)::

        model = dict(backbone=dict(  # stock mmdet ResNet
            dcn=dict(type="mmdcnv2.DCNv2", deform_groups=1, fallback_on_stride=False),
            stage_with_dcn=(False, True, True, True)))
        ConvModule(256, 256, 3, padding=1, conv_cfg=dict(type="mmdcnv2.DCNv2"))
    """

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        plain = prefix + "weight" in state_dict and prefix + "conv_offset.weight" not in state_dict
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if plain and not torch.any(self.conv_offset.weight):
            mask_bias = self.conv_offset.bias.chunk(3)[2]
            if torch.all(mask_bias == mask_bias[0]):
                with torch.no_grad():
                    self.weight.div_(torch.sigmoid(mask_bias[0]))


# The ops' classes themselves, for configs that name them (roi_layer=..., conv_cfg=...):
# mmdcnv2.DeformConv2dPack, mmdcnv2.ModulatedDeformConv2dPack, mmdcnv2.DeformRoIPool,
# mmdcnv2.DeformRoIPoolPack, mmdcnv2.ModulatedDeformRoIPoolPack.
for _cls in (DeformConv2dPack, ModulatedDeformConv2dPack, DeformRoIPool, DeformRoIPoolPack, ModulatedDeformRoIPoolPack):
    MODELS.register_module(module=_cls)
