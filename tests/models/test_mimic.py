"""R-CNN feature mimicking: the loss against a hand computation, positive-only sampling,
crops, gradients through both branches, nothing of it at inference, the hook, AMP, and
a short real training run on the embedded dataset."""

import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mmdet")

import mmdcnv2  # noqa: E402,F401
from mmdet.models.task_modules import MaxIoUAssigner  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.structures import DetDataSample  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner, load_checkpoint  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402

from mmdcnv2.engine import MimicHook  # noqa: E402
from mmdcnv2.models.mimic import CosineMimicLoss, RCNNMimicBranch, cosine_mimic_loss  # noqa: E402

register_all_modules()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MIMIC = os.path.join(ROOT, "configs", "shapes", "faster-rcnn_r18-dcnv2-mdpool-mimic_fpn_shapes.py")
PLAIN = os.path.join(ROOT, "configs", "shapes", "faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py")


# ---------------------------------------------------------------- the loss
def hand_loss_and_grads(a, b):
    """1 - a.b / (|a| |b|) per row and its derivatives, written out."""
    na, nb = a.norm(dim=1, keepdim=True), b.norm(dim=1, keepdim=True)
    dot = (a * b).sum(1, keepdim=True)
    loss = 1 - dot / (na * nb)
    ga = -(b / (na * nb) - dot * a / (na**3 * nb))
    gb = -(a / (na * nb) - dot * b / (nb**3 * na))
    return loss.squeeze(1), ga, gb


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cosine_mimic_loss_value_and_gradient(reduction):
    torch.manual_seed(0)
    a = torch.randn(6, 17, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 17, dtype=torch.float64, requires_grad=True)
    loss = CosineMimicLoss(loss_weight=0.1, reduction=reduction)(a, b)
    per_row, ga, gb = hand_loss_and_grads(a.detach(), b.detach())
    scale = 0.1 / (6 if reduction == "mean" else 1)
    torch.testing.assert_close(loss.double(), 0.1 * (per_row.mean() if reduction == "mean" else per_row.sum()))
    loss.backward()
    torch.testing.assert_close(a.grad, scale * ga, rtol=1e-5, atol=1e-7)  # float32 inside
    torch.testing.assert_close(b.grad, scale * gb, rtol=1e-5, atol=1e-7)
    # identical directions cost nothing, opposite ones cost 2
    x = torch.randn(3, 5)
    torch.testing.assert_close(cosine_mimic_loss(x, 2 * x, "none"), torch.zeros(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(cosine_mimic_loss(x, -x, "none"), torch.full((3,), 2.0))


def test_cosine_mimic_loss_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        cosine_mimic_loss(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="reduction"):
        cosine_mimic_loss(torch.randn(3, 4), torch.randn(3, 4), "max")
    with pytest.raises(ValueError, match="reduction"):
        CosineMimicLoss(reduction="none")


def test_cosine_mimic_loss_half_precision_does_not_overflow():
    a = torch.full((2, 1024), 300.0, dtype=torch.float16)  # |a|^2 overflows float16
    loss = cosine_mimic_loss(a, a.clone())
    assert loss.dtype == torch.float32 and abs(float(loss)) < 1e-5


# ---------------------------------------------------------------- sampling and crops
def branch(**kw):
    kw.setdefault("num_classes", 5)
    kw.setdefault("in_channels", 8)
    return RCNNMimicBranch(**kw)


def assigner():
    return MaxIoUAssigner(pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5, match_low_quality=False)


def sample_with(gt_boxes, gt_labels, proposals):
    ds = DetDataSample()
    ds.gt_instances = InstanceData(bboxes=torch.tensor(gt_boxes, dtype=torch.float32), labels=torch.tensor(gt_labels))
    return ds, InstanceData(bboxes=torch.tensor(proposals, dtype=torch.float32))


def iou(a, b):
    from mmdet.structures.bbox import bbox_overlaps

    return bbox_overlaps(a, b)


def test_only_positive_rois_are_mimicked():
    gts = [[10, 10, 50, 50], [60, 20, 90, 80]]
    props = [
        [12, 11, 52, 49],  # IoU 0.86 with gt 0: positive
        [10, 30, 50, 70],  # IoU 0.33: negative
        [100, 100, 120, 120],  # no overlap: negative
        [58, 25, 92, 78],  # IoU 0.80 with gt 1: positive
        [30, 10, 70, 50],  # IoU 0.33 with gt 0: negative
        [0, 0, 128, 128],
    ]  # covers both, IoU < 0.2: negative
    ds, p = sample_with(gts, [3, 1], props)
    rois, labels = branch(add_gt_as_proposals=False).sample_positives([p], [ds], assigner())
    torch.testing.assert_close(rois[:, 1:], torch.tensor([props[0], props[3]], dtype=torch.float32))
    assert rois[:, 0].tolist() == [0, 0] and labels.tolist() == [3, 1]
    assert (iou(rois[:, 1:], torch.tensor(gts, dtype=torch.float32)).max(1).values >= 0.5).all()
    # with the ground truths as candidates, they are mimicked too
    rois, labels = branch(add_gt_as_proposals=True).sample_positives([p], [ds], assigner())
    assert rois.shape[0] == 4 and sorted(labels.tolist()) == [1, 1, 3, 3]
    # a second image gets its own index; an image without positives contributes nothing
    ds2, p2 = sample_with(gts, [0, 2], [[100, 100, 120, 120]])
    rois, labels = branch(add_gt_as_proposals=False).sample_positives([p, p2], [ds, ds2], assigner())
    assert rois[:, 0].tolist() == [0, 0]


def test_at_most_num_rois_per_image_all_distinct_positives():
    gt = [[20, 20, 80, 80]]
    props = [[20 + d, 20 - d, 80 + d, 80 - d] for d in range(12)] + [[0, 0, 10, 10]] * 5
    ds, p = sample_with(gt, [4], props)
    torch.manual_seed(0)
    rois, labels = branch(num_rois=5, add_gt_as_proposals=False).sample_positives([p, p], [ds, ds], assigner())
    assert rois.shape[0] == 10 and (labels == 4).all()
    for img in (0, 1):
        boxes = rois[rois[:, 0] == img, 1:]
        assert boxes.shape[0] == 5 and torch.unique(boxes, dim=0).shape[0] == 5
        assert (iou(boxes, torch.tensor(gt, dtype=torch.float32)) >= 0.5).all()


def test_crop_is_a_bilinear_resize_of_the_roi():
    torch.manual_seed(0)
    img = torch.randn(2, 3, 40, 48)
    b = branch(crop_size=16)
    # the whole image of batch item 1, and a sub-window of item 0 (both halve per axis... and 40->16)
    crops = b.crop(img, torch.tensor([[1, 0, 0, 48, 40], [0, 8, 4, 40, 36]], dtype=torch.float32))
    assert crops.shape == (2, 3, 16, 16)
    torch.testing.assert_close(
        crops[0], F.interpolate(img[1:2], size=(16, 16), mode="bilinear", align_corners=False)[0], rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        crops[1],
        F.interpolate(img[0:1, :, 4:36, 8:40], size=(16, 16), mode="bilinear", align_corners=False)[0],
        rtol=1e-5,
        atol=1e-5,
    )


def test_branch_arguments_are_checked():
    with pytest.raises(ValueError, match="num_rois"):
        branch(num_rois=0)
    with pytest.raises(ValueError, match="crop_size"):
        branch(crop_size=2.5)


# ---------------------------------------------------------------- in the detector
def build(path, **mimic):
    cfg = Config.fromfile(path)
    if mimic:
        cfg.model.mimic.update(mimic)
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    model.init_weights()
    return model


def batch(model, training=True, seed=1):
    torch.manual_seed(seed)
    packed = demo_mm_inputs(2, [[3, 96, 128]] * 2, num_items=[3, 2], num_classes=5)
    return model.data_preprocessor(packed, training)


def test_mimic_gradients_reach_the_backbone_through_both_branches():
    model = build(MIMIC)
    model.train()
    data = batch(model)
    outputs = []

    def keep(module, args, out):
        for t in out:
            if t.requires_grad:  # c2 does not: stem and stage 1 are frozen (the pretrained backbone)
                t.retain_grad()
        outputs.append(out)

    handle = model.backbone.register_forward_hook(keep)
    x = model.extract_feat(data["inputs"])
    _, proposals = model.rpn_loss_and_proposals(x, data["data_samples"])
    losses = model.mimic.loss(model, data["inputs"], x, proposals, data["data_samples"])
    handle.remove()
    assert len(outputs) == 2, "one backbone pass for the images, one for the crops"
    images_out, crops_out = outputs
    k = int(losses["mimic_rois"])
    assert images_out[0].shape[0] == 2 and crops_out[0].shape[0] == k > 0
    assert crops_out[0].shape[-1] == 64 // 4  # the crop size of the config through the stem
    losses["loss_mimic"].backward()
    assert images_out[-1].grad.abs().sum() > 0, "no gradient through the Faster R-CNN side"
    assert crops_out[-1].grad.abs().sum() > 0, "no gradient through the R-CNN (crop) side"
    # the backbone's offsets learn from the mimic loss
    assert model.backbone.layer4[0].conv2.conv_offset.weight.grad.abs().sum() > 0
    assert model.mimic.fc_cls.weight.grad is None  # the mimic loss does not touch the classifier
    assert 0 <= float(losses["mimic_cos"]) <= 1  # ReLU features: non-negative cosine


def test_full_loss_has_the_branch_losses_and_trains_the_classifier():
    model = build(MIMIC)
    model.train()
    losses = model(**batch(model), mode="loss")
    for key in ("loss_mimic", "loss_mimic_cls", "loss_cls", "loss_bbox", "loss_rpn_cls", "loss_rpn_bbox"):
        assert key in losses, key
    total, _ = model.parse_losses(losses)
    total.backward()
    assert model.mimic.fc_cls.weight.grad.abs().sum() > 0


def test_scale_zero_skips_the_branch_but_keeps_its_parameters_in_the_graph():
    model = build(MIMIC)
    model.train()
    model.mimic.loss_scale = 0.0
    calls = []
    handle = model.backbone.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    losses = model(**batch(model), mode="loss")
    handle.remove()
    assert calls == [2] and losses["loss_mimic"].item() == 0 and losses["loss_mimic_cls"].item() == 0
    losses["loss_mimic_cls"].backward()
    assert model.mimic.fc_cls.weight.grad is not None


def called_modules(model, data):
    names = []
    handles = [m.register_forward_hook(lambda mod, a, o, n=n: names.append(n)) for n, m in model.named_modules()]
    with torch.no_grad():
        results = model(**data, mode="predict")
    for h in handles:
        h.remove()
    return names, results


def test_inference_is_the_plain_detector(tmp_path):
    mimic = build(MIMIC)
    with torch.no_grad():  # trained-looking deformation, so that the comparison means something
        for name, p in mimic.named_parameters():
            if "offset" in name or "mask_fc" in name:
                p.normal_(0, 0.01)
    path = str(tmp_path / "mimic.pth")
    torch.save({"state_dict": mimic.state_dict(), "meta": {}}, path)
    plain = build(PLAIN)
    ckpt = load_checkpoint(plain, path, map_location="cpu", strict=False)
    extra = set(ckpt["state_dict"]) - set(plain.state_dict())
    assert extra == {"mimic.fc_cls.weight", "mimic.fc_cls.bias"}
    mimic.eval()
    plain.eval()
    ours_called, ours = called_modules(mimic, batch(mimic, training=False))
    plain_called, theirs = called_modules(plain, batch(plain, training=False))
    assert ours_called == plain_called and not any(n.startswith("mimic") for n in ours_called)
    for a, b in zip(ours, theirs):
        assert len(a.pred_instances) > 0
        torch.testing.assert_close(a.pred_instances.bboxes, b.pred_instances.bboxes, rtol=0, atol=0)
        torch.testing.assert_close(a.pred_instances.scores, b.pred_instances.scores, rtol=0, atol=0)
    # the exported/traced form is the plain one too
    data = batch(mimic, training=False)
    with torch.no_grad():
        ours = mimic._forward(data["inputs"], data["data_samples"])
        theirs = plain._forward(data["inputs"], data["data_samples"])
    for a, b in zip(ours, theirs):
        for u, v in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_mimic_needs_shared_fcs():
    cfg = Config.fromfile(MIMIC)
    cfg.model.roi_head.bbox_head.update(type="ConvFCBBoxHead", num_shared_fcs=0, num_cls_fcs=1, num_reg_fcs=1)
    with pytest.raises(TypeError, match="shared fc"):
        MODELS.build(cfg.model)


def test_bfloat16_autocast():
    # mmcv's CPU nms (the RPN's) rejects bfloat16, so on the CPU the branch alone runs
    # under autocast; the whole detector runs under float16 autocast in the GPU test below
    model = build(MIMIC)
    model.train()
    data = batch(model)
    x = model.extract_feat(data["inputs"])
    _, proposals = model.rpn_loss_and_proposals(x, data["data_samples"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = model.extract_feat(data["inputs"])
        losses = model.mimic.loss(model, data["inputs"], x, proposals, data["data_samples"])
    assert losses["loss_mimic"].dtype == torch.float32 and torch.isfinite(losses["loss_mimic"])
    (losses["loss_mimic"] + losses["loss_mimic_cls"]).backward()
    assert model.mimic.fc_cls.weight.grad.abs().sum() > 0


@pytest.mark.gpu
def test_float16_amp_on_gpu():
    model = build(MIMIC).cuda()
    model.train()
    packed = demo_mm_inputs(2, [[3, 96, 128]] * 2, num_items=[3, 2], num_classes=5)
    data = model.data_preprocessor(packed, True)
    with torch.autocast("cuda", dtype=torch.float16):
        losses = model(**data, mode="loss")
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total)
    total.backward()
    assert model.mimic.fc_cls.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- the hook
def test_hook_schedule_and_checks():
    hook = MimicHook(begin_iter=2, warmup_iters=4, end_iter=10)
    assert [hook.scale_at(i) for i in range(12)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1, 1, 1, 0, 0]
    assert MimicHook().scale_at(0) == 1.0
    with pytest.raises(ValueError, match="end_iter"):
        MimicHook(begin_iter=5, end_iter=3)
    with pytest.raises(ValueError, match="warmup_iters"):
        MimicHook(warmup_iters=-1)

    class FakeRunner:
        model = build(PLAIN)

    with pytest.raises(TypeError, match="MimicRCNN"):
        MimicHook().before_train(FakeRunner())


def test_short_training_run_on_the_embedded_dataset(tmp_path):
    from mmdcnv2.datasets import make_shapes_dataset

    data = str(tmp_path / "shapes")
    make_shapes_dataset(data, num_train=8, num_val=2, size=96, progress=None)
    cfg = Config.fromfile(MIMIC)
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].dataset.data_root = data + "/"
        cfg[loader].update(num_workers=0, persistent_workers=False, batch_size=2)
    for ev in ("val_evaluator", "test_evaluator"):
        cfg[ev].ann_file = data + "/annotations/val.json"
    cfg.train_cfg.update(max_iters=4, val_interval=1000)
    cfg.default_hooks.checkpoint.interval = 4
    cfg.default_hooks.logger.interval = 1
    cfg.custom_hooks = [dict(type="mmdcnv2.MimicHook", warmup_iters=2)]
    cfg.work_dir = str(tmp_path / "work")
    runner = Runner.from_cfg(cfg)
    before = {k: v.clone() for k, v in runner.model.state_dict().items() if "conv_offset" in k}
    runner.train()
    hub = runner.message_hub
    assert hub.get_scalar("train/mimic_scale").current() == 1.0
    for key in ("train/loss_mimic", "train/loss_mimic_cls", "train/mimic_cos"):
        values = hub.get_scalar(key).data[0]
        assert len(values) == 4 and all(v == v for v in values), key  # logged every iteration, finite
    assert hub.get_scalar("train/loss_mimic").data[0][0] > 0
    after = runner.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert os.path.exists(os.path.join(cfg.work_dir, "iter_4.pth"))


@pytest.mark.parametrize("layer", ["mmdcnv2.DeformRoIPoolPack", "mmdcnv2.ModulatedDeformRoIPoolPack"])
def test_deformable_roi_extractor_under_autocast(layer):
    """mmdet's extractor writes RoI features into a buffer of the features' dtype."""
    extractor = MODELS.build(
        dict(
            type="mmdcnv2.DeformRoIExtractor",
            out_channels=8,
            featmap_strides=[4, 8],
            roi_layer=dict(type=layer, output_size=7, output_channels=8, deform_fc_channels=16),
        )
    )
    feats = (torch.randn(1, 8, 24, 24), torch.randn(1, 8, 12, 12))
    rois = torch.tensor([[0, 4, 4, 40, 40], [0, 10, 2, 90, 80]], dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = extractor(tuple(f.bfloat16() for f in feats), rois)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), extractor(feats, rois), rtol=0.05, atol=0.05)
