"""Registration, conv layers and the per-stage DCN backbones."""

import pytest
import torch

pytest.importorskip("mmdet")

import mmdcnv2  # noqa: E402,F401  (registers)
from mmcv.cnn import ConvModule, build_conv_layer  # noqa: E402
from mmdet.registry import MODELS as MMDET_MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from mmdcnv2.models import DCN, DCNv2, DCNBasicBlock  # noqa: E402
from mmdcnv2.ops import DeformConv2dPack, ModulatedDeformConv2dPack, ModulatedDeformRoIPoolPack  # noqa: E402
from mmdcnv2.registry import MODELS  # noqa: E402

register_all_modules()


def test_scoped_names_resolve_and_do_not_shadow_mmcv():
    assert MMDET_MODELS.get("mmdcnv2.DCNv2") is DCNv2
    assert MMDET_MODELS.get("mmdcnv2.DCN") is DCN
    assert MMDET_MODELS.get("mmdcnv2.ModulatedDeformRoIPoolPack") is ModulatedDeformRoIPoolPack
    import mmcv.ops

    assert MMDET_MODELS.get("DCNv2") is mmcv.ops.ModulatedDeformConv2dPack
    assert MMDET_MODELS.get("DCN") is mmcv.ops.DeformConv2dPack
    assert MODELS.scope == "mmdcnv2" and MODELS.parent is MMDET_MODELS


def test_build_conv_layer_and_conv_module():
    layer = build_conv_layer(dict(type="mmdcnv2.DCNv2", deform_groups=2), 8, 8, 3, padding=1, bias=False)
    assert isinstance(layer, ModulatedDeformConv2dPack) and layer.deform_groups == 2 and layer.bias is None
    layer = build_conv_layer(dict(type="mmdcnv2.DCN"), 8, 4, 3, stride=2, padding=1)
    assert isinstance(layer, DeformConv2dPack) and layer.stride == (2, 2)
    cm = ConvModule(8, 6, 3, padding=1, conv_cfg=dict(type="mmdcnv2.DCNv2"), norm_cfg=dict(type="BN"))
    out = cm(torch.randn(2, 8, 10, 10))
    assert out.shape == (2, 6, 10, 10) and (out >= 0).all()


def test_stock_mmdet_resnet_takes_our_layers():
    bb = MMDET_MODELS.build(
        dict(
            type="ResNet",
            depth=50,
            num_stages=4,
            out_indices=(0, 1, 2, 3),
            dcn=dict(type="mmdcnv2.DCNv2", deform_groups=1, fallback_on_stride=False),
            stage_with_dcn=(False, True, True, True),
        )
    )
    assert isinstance(bb.layer2[0].conv2, DCNv2) and not isinstance(bb.layer1[0].conv2, DCNv2)
    outs = bb(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [256, 512, 1024, 2048]


def _features(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    outs = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        x = getattr(model, name)(x)
        outs.append(x)
    return outs


@pytest.mark.parametrize(
    "depth,stage_dcn",
    [
        (18, (None, "DCNv2", "DCNv2", "DCNv2")),
        (34, ("DCN", None, dict(type="DCNv2", deform_groups=2), "DCN")),
        (50, (None, "DCNv2", "DCNv2", dict(type="mmdcnv2.DCNv2", deform_groups=4))),
    ],
)
def test_loads_torchvision_resnet_and_starts_as_it(depth, stage_dcn):
    tv = pytest.importorskip("torchvision")
    ref = getattr(tv.models, f"resnet{depth}")(weights=None).eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    bb = MODELS.build(dict(type="mmdcnv2.DCNResNet", depth=depth, stage_dcn=stage_dcn, norm_eval=True))
    bb.eval()  # (mmdet's ResNet.train returns None, so no chaining)
    missing, unexpected = bb.load_state_dict(ref.state_dict(), strict=False)
    assert all("conv_offset" in k for k in missing), missing
    assert set(unexpected) == {"fc.weight", "fc.bias"}
    n_dcn = sum(isinstance(m, (DCN, DCNv2)) for m in bb.modules())
    assert n_dcn == sum(len(getattr(bb, f"layer{i + 1}")) for i, s in enumerate(stage_dcn) if s is not None)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        for a, b in zip(bb(x), _features(ref, x)):  # float32 sums in another order, 50 layers deep
            torch.testing.assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-3)


def test_basic_block_with_dcn_and_mmdet_checkpoint():
    plain = MMDET_MODELS.build(dict(type="ResNet", depth=18))
    ours = MODELS.build(dict(type="mmdcnv2.DCNResNet", depth=18, stage_dcn=(None, None, "DCNv2", "DCN")))
    plain.eval()
    ours.eval()
    assert isinstance(ours.layer3[1], DCNBasicBlock) and isinstance(ours.layer3[1].conv2, DCNv2)
    assert isinstance(ours.layer4[0].conv2, DCN)
    ours.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        for a, b in zip(ours(x), plain(x)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # a trained layer (non-zero offsets) really deforms, and gradients reach the offsets
    with torch.no_grad():
        ours.layer3[1].conv2.conv_offset.weight.normal_(0, 0.1)
    ours.train()
    ours(x)[2].sum().backward()
    assert ours.layer3[1].conv2.conv_offset.weight.grad.abs().sum() > 0


def test_dcnv2_checkpoint_with_offsets_loads_unchanged():
    a = DCNv2(8, 8, 3, padding=1)
    with torch.no_grad():
        a.conv_offset.weight.normal_()
    b = DCNv2(8, 8, 3, padding=1)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.weight, a.weight)


def test_resnext_with_stage_dcn():
    bb = MODELS.build(
        dict(type="mmdcnv2.DCNResNeXt", depth=50, groups=32, base_width=4, stage_dcn=(None, "DCNv2", "DCNv2", "DCNv2"))
    )
    plain = MMDET_MODELS.build(dict(type="ResNeXt", depth=50, groups=32, base_width=4))
    bb.eval()
    plain.eval()
    assert bb.layer2[0].conv2.groups == 32
    bb.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bb(x)[3], plain(x)[3], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(stage_dcn=("DCNv2",)), "one entry per stage"),
        (dict(stage_dcn=(None, "DCNv3", None, None)), "stage_dcn entries"),
        (dict(stage_dcn=(None, None, None, "DCN"), dcn=dict(type="DCN"), stage_with_dcn=(False,) * 4), "not both"),
    ],
)
def test_bad_stage_dcn(bad, match):
    with pytest.raises(ValueError, match=match):
        MODELS.build(dict(type="mmdcnv2.DCNResNet", depth=18, **bad))
