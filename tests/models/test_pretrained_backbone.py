"""The shapes configs' pretrained backbone: the shipped checkpoint, how the configs load it (DCN
layers from the plain conv weights), that its features carry the classes, and the tool that made it."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("mmdet")

import mmdcnv2  # noqa: E402,F401
from mmengine.config import Config  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from mmdcnv2.datasets.shapes import CROP_CLASSES, make_crop  # noqa: E402
from mmdcnv2.models import DCN, DCNv2  # noqa: E402
from mmdcnv2.models.backbones.resnet import DCNResNet  # noqa: E402

register_all_modules()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CKPT = os.path.join(ROOT, "checkpoints", "resnet18-half_shapes-pretrained.pth")
SHAPES = os.path.join(ROOT, "configs", "shapes")
sys.path.insert(0, os.path.join(ROOT, "tools"))


def plain_backbone():
    return DCNResNet(
        depth=18,
        base_channels=32,
        num_stages=4,
        out_indices=(3,),
        frozen_stages=-1,
        norm_cfg=dict(type="BN", requires_grad=True),
        norm_eval=False,
    )


def test_checkpoint_is_small_float16_with_its_provenance():
    assert os.path.getsize(CKPT) < 8 * 2**20
    ckpt = torch.load(CKPT, map_location="cpu", weights_only=False)
    floats = [v for v in ckpt["state_dict"].values() if v.is_floating_point()]
    assert floats and all(v.dtype == torch.float16 for v in floats)
    meta = ckpt["meta"]
    assert meta["command"].startswith("python tools/pretrain_backbone.py")
    assert 0.5 < meta["accuracy"] <= 1 and set(meta["per_class"]) == set(CROP_CLASSES)
    # exactly the plain backbone's keys (mmdet ResNet layout), nothing missing, nothing extra
    plain_backbone().load_state_dict(ckpt["state_dict"], strict=True)


@pytest.mark.parametrize(
    "config, dcn_type",
    [
        ("faster-rcnn_r18_fpn_shapes.py", None),
        ("faster-rcnn_r18-dcnv1-dpool_fpn_shapes.py", DCN),
        ("faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py", DCNv2),
    ],
)
def test_shapes_configs_start_from_it(config, dcn_type):
    cfg = Config.fromfile(os.path.join(SHAPES, config))
    assert cfg.model.backbone.init_cfg.checkpoint.endswith("checkpoints/resnet18-half_shapes-pretrained.pth")
    model = MODELS.build(cfg.model)
    model.init_weights()
    sd = {k: v.float() for k, v in torch.load(CKPT, map_location="cpu", weights_only=False)["state_dict"].items()}
    bb = model.backbone
    torch.testing.assert_close(bb.conv1.weight, sd["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(bb.layer4[1].bn2.running_var, sd["layer4.1.bn2.running_var"], rtol=0, atol=0)
    for stage in (2, 3, 4):
        conv2 = getattr(bb, f"layer{stage}")[0].conv2
        want = sd[f"layer{stage}.0.conv2.weight"]
        if dcn_type is None:
            assert type(conv2) is torch.nn.Conv2d
            torch.testing.assert_close(conv2.weight, want, rtol=0, atol=0)
        else:
            assert isinstance(conv2, dcn_type)
            # a DCNv2 layer starts with modulation sigmoid(0) = 0.5 and loads weight / 0.5 (exact in float)
            scale = 2.0 if dcn_type is DCNv2 else 1.0
            torch.testing.assert_close(conv2.weight, want * scale, rtol=0, atol=0)
            assert not conv2.conv_offset.weight.any()
    # like mmdet's ImageNet configs: stem and stage 1 frozen, batch norm frozen (eval mode in training)
    model.train()
    assert not any(p.requires_grad for p in bb.layer1.parameters()) and not bb.conv1.weight.requires_grad
    assert all(p.requires_grad for p in bb.layer2[0].conv1.parameters())
    assert not bb.layer3[0].bn1.training and not bb.layer3[0].bn1.weight.requires_grad


def _pooled_features(backbone, crops):
    from pretrain_backbone import to_tensor

    backbone.eval()  # (mmdet's ResNet.train() returns None: no chaining)
    with torch.no_grad():
        x = torch.stack([to_tensor(im) for im in crops])
        return F.adaptive_avg_pool2d(backbone(x)[-1], 1).flatten(1)


def _probe_accuracy(feats, labels, n_train):
    """Nearest class mean on standardised features: a linear probe with no training loop."""
    mu, sd = feats[:n_train].mean(0), feats[:n_train].std(0) + 1e-6
    f = (feats - mu) / sd
    means = torch.stack([f[:n_train][labels[:n_train] == c].mean(0) for c in range(len(CROP_CLASSES))])
    pred = torch.cdist(f[n_train:], means).argmin(1)
    return (pred == labels[n_train:]).float().mean().item()


def test_its_features_carry_the_classes():
    """A nearest-class-mean probe on fresh crops (seed 7, never used in pretraining): the pretrained
    features separate the 6 classes far better than those of the same network at random init."""
    crops, labels = zip(*(make_crop(np.random.RandomState([7, i]), 64, 128) for i in range(360)))
    labels = torch.tensor(labels)
    torch.manual_seed(0)
    random_init = plain_backbone()
    random_init.init_weights()
    pretrained = plain_backbone()
    sd = torch.load(CKPT, map_location="cpu", weights_only=False)["state_dict"]
    pretrained.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()})
    acc_pre = _probe_accuracy(_pooled_features(pretrained, crops), labels, 240)
    acc_rand = _probe_accuracy(_pooled_features(random_init, crops), labels, 240)
    print(f"nearest-class-mean probe: pretrained {acc_pre:.3f}, random init {acc_rand:.3f}")
    assert acc_pre > 0.5 and acc_pre > acc_rand + 0.15, (acc_pre, acc_rand)


def test_pretrain_tool_trains_saves_and_never_overwrites(tmp_path):
    out = tmp_path / "bb.pth"
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tools", "pretrain_backbone.py"),
        "--steps",
        "3",
        "--batch-size",
        "6",
        "--val",
        "12",
        "--workers",
        "0",
        "--log-every",
        "1",
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "step 3/3" in run.stdout and "validation accuracy" in run.stdout
    ckpt = torch.load(out, map_location="cpu", weights_only=False)
    plain_backbone().load_state_dict(ckpt["state_dict"], strict=True)
    assert ckpt["meta"]["steps"] == 3 and 0 <= ckpt["meta"]["accuracy"] <= 1
    before = out.read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode != 0 and "exists" in again.stderr and out.read_bytes() == before
    bad = subprocess.run(cmd[:2] + ["--steps", "0", "--out", str(tmp_path / "x.pth")], capture_output=True, text=True)
    assert bad.returncode != 0 and "--steps" in bad.stderr and not (tmp_path / "x.pth").exists()
