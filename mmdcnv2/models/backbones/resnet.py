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
    """mmdet's BasicBlock (ResNet-18/34), with ``dcn`` replacing its second 3x3 conv (stride 1, padding 1,
    no bias), which mmdet's BasicBlock refuses. ``dcn`` is a conv-layer config for mmcv's
    ``build_conv_layer`` (``dict(type='mmdcnv2.DCNv2', ...)``; its ``fallback_on_stride`` is ignored: the
    second conv has stride 1). Other arguments and state-dict keys are mmdet's BasicBlock's.
    """

    def __init__(
        self,
        inplanes,
        planes,
        stride=1,
        dilation=1,
        downsample=None,
        style="pytorch",
        with_cp=False,
        conv_cfg=None,
        norm_cfg=dict(type="BN"),
        dcn=None,
        plugins=None,
        init_cfg=None,
    ):
        super().__init__(
            inplanes,
            planes,
            stride=stride,
            dilation=dilation,
            downsample=downsample,
            style=style,
            with_cp=with_cp,
            conv_cfg=conv_cfg,
            norm_cfg=norm_cfg,
            dcn=None,
            plugins=plugins,
            init_cfg=init_cfg,
        )
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
    """mmdet's ResNet whose stages each choose no DCN, DCNv1 or DCNv2: ``type='mmdcnv2.DCNResNet'``.

    Args:
        stage_dcn (sequence, optional): one entry per stage (``num_stages``, 4 by default): ``None``
            (the regular 3x3 conv), ``'DCN'``, ``'DCNv2'`` (our ``mmdcnv2.DCN`` / ``mmdcnv2.DCNv2``) or
            a layer config such as ``dict(type='DCNv2', deform_groups=4)`` (``'DCN'``/``'DCNv2'`` there
            mean ours too; ``fallback_on_stride`` defaults to False). The layer replaces each block's
            3x3 conv: ``conv2`` of the Bottleneck (ResNet-50/101/152) and of :class:`DCNBasicBlock`
            (ResNet-18/34). Default: ``None``, no DCN unless ``dcn``/``stage_with_dcn`` ask for it.
        **kwargs: mmdet ResNet's arguments (``depth`` in 18, 34, 50, 101, 152, ``num_stages``,
            ``norm_cfg``, ``norm_eval``, ``frozen_stages``, ``init_cfg``, ...), the stock
            ``dcn=``/``stage_with_dcn=`` included (which now also work for ResNet-18/34).

    State-dict keys are mmdet ResNet's, plus ``layerX.Y.conv2.conv_offset.{weight,bias}`` for the
    deformable layers, so ImageNet checkpoints of the plain ResNet (mmdet or torchvision layout) load
    (their missing ``conv_offset`` keys stay zero; a DCNv2 layer divides the loaded weight by its 0.5
    modulation) and, with those zero offsets, the network computes the plain ResNet's function.

    Raises:
        ValueError: ``stage_dcn`` without one entry per stage, with an entry that is not ``None``,
            ``'DCN'``, ``'DCNv2'`` or a dict with a ``type``, or given together with ``dcn``.

    Example::

        model = dict(backbone=dict(
            type="mmdcnv2.DCNResNet", depth=50,
            stage_dcn=(None, "DCN", "DCNv2", dict(type="DCNv2", deform_groups=4))))
    """

    arch_settings = {
        18: (DCNBasicBlock, (2, 2, 2, 2)),
        34: (DCNBasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    }


@MODELS.register_module()
class DCNResNeXt(_PerStageDCN, ResNeXt):
    """mmdet's ResNeXt (depth 50, 101, 152) whose stages each choose no DCN, DCNv1 or DCNv2:
    ``type='mmdcnv2.DCNResNeXt'``.

    ``stage_dcn`` as in :class:`DCNResNet` (the layer replaces the grouped 3x3 ``conv2`` of each
    Bottleneck, with ResNeXt's ``groups``); every other argument (``groups``, ``base_width``, ...) and
    the state-dict keys are mmdet ResNeXt's.

    Example::

        model = dict(backbone=dict(
            type="mmdcnv2.DCNResNeXt", depth=101, groups=32, base_width=4,
            stage_dcn=(None, "DCNv2", "DCNv2", "DCNv2")))
    """

    arch_settings = {
        50: (XBottleneck, (3, 4, 6, 3)),
        101: (XBottleneck, (3, 4, 23, 3)),
        152: (XBottleneck, (3, 8, 36, 3)),
    }
