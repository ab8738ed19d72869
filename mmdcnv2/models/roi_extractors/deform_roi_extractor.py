"""A SingleRoIExtractor whose per-level RoI layers may come from mmdcnv2's registry."""
from mmcv import ops as mmcv_ops
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor
from torch import nn

from mmdcnv2.registry import MODELS


@MODELS.register_module()
class DeformRoIExtractor(SingleRoIExtractor):
    """mmdet's SingleRoIExtractor, except that ``roi_layer.type`` is looked up in
    mmdcnv2's registry first (``'mmdcnv2.ModulatedDeformRoIPoolPack'``,
    ``'mmdcnv2.DeformRoIPoolPack'``, ``'mmdcnv2.DeformRoIPool'``), then in ``mmcv.ops``
    (``'RoIAlign'``). Levels, state-dict keys and forward are mmdet's."""

    def build_roi_layers(self, layer_cfg, featmap_strides) -> nn.ModuleList:
        cfg = dict(layer_cfg)
        layer_type = cfg.pop("type")
        if isinstance(layer_type, str):
            layer_cls = MODELS.get(layer_type)
            if layer_cls is None and hasattr(mmcv_ops, layer_type):
                layer_cls = getattr(mmcv_ops, layer_type)
            if layer_cls is None:
                raise KeyError(f"roi_layer type {layer_type!r} is neither in mmdcnv2's registry nor in mmcv.ops")
        else:
            layer_cls = layer_type
        return nn.ModuleList([layer_cls(spatial_scale=1 / s, **cfg) for s in featmap_strides])
