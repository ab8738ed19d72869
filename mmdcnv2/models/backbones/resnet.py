"""ResNet and ResNeXt whose stages each choose no DCN, DCNv1 or DCNv2.

``stage_dcn`` gives one entry per stage: ``None`` (regular 3x3 conv), ``'DCN'``,
``'DCNv2'`` or a full layer config such as ``dict(type='mmdcnv2.DCNv2',
deform_groups=4)``. ResNet-18/34's BasicBlock takes DCN in its second 3x3 conv (the
stock mmdet ResNet refuses DCN there). The stock ``dcn=``/``stage_with_dcn=``
arguments still work. State-dict keys are those of mmdet's ResNet, so plain ResNet
checkpoints (mmdet or torchvision layout) load, and with zero-initialised offsets
the network computes the plain ResNet's function.
"""
from mmdet.models.backbones.resnet import BasicBlock, Bottleneck, ResNet
from mmdet.models.backbones.resnext import Bottleneck as XBottleneck
from mmdet.models.backbones.resnext import ResNeXt
from mmcv.cnn import build_conv_layer

from mmdcnv2.registry import MODELS

_SHORT = {"DCN": "mmdcnv2.DCN", "DCNv2": "mmdcnv2.DCNv2"}


def _stage_cfg(entry):
    if entry is None:
        return None
    if isinstance(entry, str):
        if entry not in _SHORT:
            raise ValueError(f"stage_dcn entries must be None, 'DCN', 'DCNv2' or a dict, got {entry!r}")
        return dict(type=_SHORT[entry], fallback_on_stride=False)
    if isinstance(entry, dict) and "type" in entry:
        cfg = dict(entry)
        cfg["type"] = _SHORT.get(cfg["type"], cfg["type"])
        cfg.setdefault("fallback_on_stride", False)
        return cfg
    raise ValueError(f"stage_dcn entries must be None, 'DCN', 'DCNv2' or a dict with a 'type', got {entry!r}")


class DCNBasicBlock(BasicBlock):
    """mmdet's BasicBlock, with ``dcn`` replacing its second 3x3 conv (stride 1)."""

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None, style="pytorch", with_cp=False,
                 conv_cfg=None, norm_cfg=dict(type="BN"), dcn=None, plugins=None, init_cfg=None):
        super().__init__(inplanes, planes, stride=stride, dilation=dilation, downsample=downsample, style=style,
                         with_cp=with_cp, conv_cfg=conv_cfg, norm_cfg=norm_cfg, dcn=None, plugins=plugins,
                         init_cfg=init_cfg)
        if dcn is not None:
            cfg = dict(dcn)
            cfg.pop("fallback_on_stride", None)
            self.conv2 = build_conv_layer(cfg, planes, planes, 3, padding=1, bias=False)


class _PerStageDCN:
    """Routes one DCN config per stage into ``make_res_layer``."""

    def __init__(self, *args, stage_dcn=None, **kwargs):
        if stage_dcn is not None:
            num_stages = kwargs.get("num_stages", 4)
            if len(stage_dcn) != num_stages:
                raise ValueError(f"stage_dcn must have one entry per stage ({num_stages}), got {len(stage_dcn)}")
            if kwargs.get("dcn") is not None:
                raise ValueError("give either stage_dcn or dcn/stage_with_dcn, not both")
        self._pending_stage_dcn = [_stage_cfg(e) for e in stage_dcn] if stage_dcn is not None else None
        self.stage_dcn = stage_dcn
        super().__init__(*args, **kwargs)
        del self._pending_stage_dcn

    def make_res_layer(self, **kwargs):
        if self._pending_stage_dcn is not None:
            kwargs["dcn"] = self._pending_stage_dcn.pop(0)
        return super().make_res_layer(**kwargs)


@MODELS.register_module()
class DCNResNet(_PerStageDCN, ResNet):
    """mmdet's ResNet with ``stage_dcn`` (see the module docstring) and DCN in BasicBlock."""

    arch_settings = {
        18: (DCNBasicBlock, (2, 2, 2, 2)),
        34: (DCNBasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }


@MODELS.register_module()
class DCNResNeXt(_PerStageDCN, ResNeXt):
    """mmdet's ResNeXt with ``stage_dcn``."""

    arch_settings = {
        50: (XBottleneck, (3, 4, 6, 3)),
        101: (XBottleneck, (3, 4, 23, 3)),
        152: (XBottleneck, (3, 8, 36, 3)),
    }
