"""Every config builds its model and runs training and inference forward passes;
and our configs are interchangeable with mmdet's own dcn/dcnv2 configs (model zoo)."""

import copy
import glob
import os

import pytest
import torch

pytest.importorskip("mmdet")

import mmdcnv2  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from mmdcnv2.models import DCN, DCNv2  # noqa: E402
from mmdcnv2.ops import DeformRoIPoolPack  # noqa: E402

register_all_modules()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if not os.path.basename(p).startswith("_")
)


def build(cfg_path):
    cfg = Config.fromfile(cfg_path)
    if "mimic" in cfg.model and "coco" in cfg_path:  # keep the R-50 crop pass small on a CPU
        cfg.model.mimic.update(num_rois=2, crop_size=64)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)  # init_weights() is not called: nothing is downloaded
    return cfg, model


def rel(p):
    return os.path.relpath(p, ROOT)


@pytest.mark.parametrize("path", CONFIGS, ids=rel)
def test_config_builds_trains_and_predicts(path):
    cfg, model = build(path)
    assert cfg.custom_imports["imports"] == ["mmdcnv2"]
    has_ours = any(isinstance(m, (DCN, DCNv2, DeformRoIPoolPack)) for m in model.modules())
    assert has_ours or os.path.basename(path) == "faster-rcnn_r18_fpn_shapes.py", "no mmdcnv2 layer in it"
    with_mask = "mask" in os.path.basename(path)
    num_classes = cfg.model.roi_head.bbox_head.num_classes
    side = 96 if "shapes" in path else 128
    packed = demo_mm_inputs(
        2, [[3, side, side + 32]] * 2, num_items=[3, 2], num_classes=num_classes, with_mask=with_mask
    )
    data = model.data_preprocessor(packed, True)
    model.train()
    losses = model(**data, mode="loss")
    total = sum(v.sum() for k, v in losses.items() if "loss" in k and isinstance(v, torch.Tensor)) + sum(
        sum(x.sum() for x in v) for k, v in losses.items() if "loss" in k and isinstance(v, list)
    )
    assert torch.isfinite(total)
    total.backward()
    model.eval()
    with torch.no_grad():
        results = model(**model.data_preprocessor(packed, False), mode="predict")
    assert len(results) == 2 and hasattr(results[0], "pred_instances")


# (mmdet's own config, ours): same keys, shapes, checkpoints and detections.
PAIRS = [
    ("dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py", "dcnv2/faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py"),
    (
        "dcnv2/faster-rcnn_r50-mdconv-group4-c3-c5_fpn_1x_coco.py",
        "dcnv2/faster-rcnn_r50-mdconv-group4-c3-c5_fpn_1x_coco.py",
    ),
    ("dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py", "dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py"),
    ("dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py", "dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py"),
    ("dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py", "dcnv2/faster-rcnn_r50-mdpool_fpn_1x_coco.py"),
    ("dcn/faster-rcnn_r50_fpn_dpool_1x_coco.py", "dcn/faster-rcnn_r50-dpool_fpn_1x_coco.py"),
]


def mmdet_config(name):
    import mmdet

    return os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", name)


def randomise_deformation(model):
    """Non-zero offsets, masks and RoI offsets, so that deformation really happens."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "conv_offset" in name or "offset_fc.4" in name or "mask_fc.2" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def detections(model, packed):
    model.eval()
    with torch.no_grad():
        res = model(**model.data_preprocessor(copy.deepcopy(packed), False), mode="predict")
    return [(r.pred_instances.bboxes, r.pred_instances.scores, r.pred_instances.labels) for r in res]


@pytest.mark.parametrize("theirs,ours", PAIRS, ids=[p[1] for p in PAIRS])
def test_model_zoo_interoperability(theirs, ours):
    _, m_theirs = build(mmdet_config(theirs))
    _, m_ours = build(os.path.join(ROOT, "configs", ours))
    sd_theirs, sd_ours = m_theirs.state_dict(), m_ours.state_dict()
    assert list(sd_theirs) == list(sd_ours)
    assert all(sd_theirs[k].shape == sd_ours[k].shape for k in sd_theirs)
    randomise_deformation(m_theirs)
    m_ours.load_state_dict(m_theirs.state_dict(), strict=True)
    m_theirs.load_state_dict(m_ours.state_dict(), strict=True)
    if "pool" in ours:
        return  # mmcv's deformable RoI pooling has no CPU kernel: detections are compared on a GPU only
    for m in (m_theirs, m_ours):
        m.test_cfg.rcnn.score_thr = 0.0
    packed = demo_mm_inputs(1, [[3, 160, 192]], num_items=[2], num_classes=80, with_mask="mask" in ours)
    for (b1, s1, l1), (b2, s2, l2) in zip(detections(m_theirs, packed), detections(m_ours, packed)):
        assert len(b1) > 0
        torch.testing.assert_close(b1, b2, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(s1, s2, atol=1e-4, rtol=1e-4)
        assert torch.equal(l1, l2)
