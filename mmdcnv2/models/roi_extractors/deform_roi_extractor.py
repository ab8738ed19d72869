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
    (``'RoIAlign'``). Levels, state-dict keys and forward are mmdet's.

    ``type='mmdcnv2.DeformRoIExtractor'``. mmdet's own SingleRoIExtractor takes its RoI layer from
    ``mmcv.ops`` only, so it builds mmcv's deformable RoI pooling (CUDA only in mmcv 2.1.0) unless
    ``mmdcnv2.mmcv_ops`` is imported; this one builds ours (CPU and CUDA) from the config alone.

    Args:
        roi_layer (dict): the RoI layer's config; ``type`` is a name of mmdcnv2's registry (an
            unscoped name is looked up there, then in its parents, mmdet's and mmengine's), a name
            in ``mmcv.ops``, or a class. Every other key goes to the layer; ``spatial_scale`` is
            filled in per level (1 / stride). For the Pack layers give ``output_size`` and
            ``output_channels`` (= ``out_channels``).
        out_channels (int), featmap_strides (list of int), finest_scale (int), init_cfg: as in mmdet's
            SingleRoIExtractor.

    State dict: ``roi_layers.<level>.*``, the layers' own keys (``offset_fc.*``, ``mask_fc.*`` for
    the Packs, one set per level, as with mmdet and mmcv), so mmdet's ``dpool``/``mdpool`` checkpoints
    load.

    Raises:
        KeyError: ``roi_layer.type`` is neither in mmdcnv2's registry (or its parents) nor in
            ``mmcv.ops``, or is scoped ``mmdcnv2.<Name>`` with a name we do not register.

    Example::

        model = dict(roi_head=dict(bbox_roi_extractor=dict(
            type="mmdcnv2.DeformRoIExtractor",
            roi_layer=dict(_delete_=True, type="mmdcnv2.ModulatedDeformRoIPoolPack",
                           output_size=7, output_channels=256))))
    """

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
