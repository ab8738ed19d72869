"""mmdcnv2's registries: children of mmdet's, with the scope ``mmdcnv2``.

Configs name our components ``mmdcnv2.<Name>``; they never shadow mmcv's or
mmdet's own ``DCN``/``DCNv2``.
"""
from mmdet.registry import HOOKS as MMDET_HOOKS
from mmdet.registry import MODELS as MMDET_MODELS
from mmengine.registry import Registry

MODELS = Registry("model", parent=MMDET_MODELS, scope="mmdcnv2", locations=["mmdcnv2.models"])
HOOKS = Registry("hook", parent=MMDET_HOOKS, scope="mmdcnv2", locations=["mmdcnv2.engine.hooks"])
