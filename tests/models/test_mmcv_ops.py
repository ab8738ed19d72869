"""mmdcnv2.mmcv_ops (mmcv's deformable ops on our kernels), mmcv's spellings (deformable_groups, pre-2.0
checkpoint keys) and the mmdcnv2 scope's registries."""

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

pytest.importorskip("mmdet")

import mmcv.ops  # noqa: E402
from mmcv.cnn import build_conv_layer  # noqa: E402
from mmengine.registry import MODELS as ROOT_MODELS  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402

import mmdcnv2  # noqa: E402,F401
from mmdcnv2 import ops  # noqa: E402

register_all_modules()
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def switch():
    """mmdcnv2.mmcv_ops imported (which redirects), and switched off again afterwards."""
    from mmdcnv2 import mmcv_ops

    mmcv_ops.redirect()
    yield mmcv_ops
    mmcv_ops.restore()


@pytest.fixture
def mmcv_original():
    """mmcv's own objects (whether or not another test left the switch on: it is restored here)."""
    from mmdcnv2 import mmcv_ops

    mmcv_ops.restore()
    return mmcv_ops.MMCV_ORIGINALS


def _child_python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )


def test_nothing_changes_unless_imported_then_custom_imports_redirects(tmp_path):
    """In a fresh process: `import mmdcnv2` leaves mmcv alone; a config's custom_imports with
    mmdcnv2.mmcv_ops redirects mmcv.ops, its submodules, mmdet's modules and the registry, logging once."""
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        'custom_imports = dict(imports=["mmdcnv2", "mmdcnv2.mmcv_ops"], allow_failed_imports=False)\n'
        'conv = dict(type="DCNv2", deform_groups=1)\n'
    )
    out = _child_python(f"""
        import sys
        import mmcv.ops, mmcv.ops.saconv as saconv
        import mmdcnv2
        from mmdet.utils import register_all_modules
        register_all_modules()
        from mmdet.models.dense_heads import reppoints_head, tood_head, atss_vlfusion_head
        from mmdet.models.necks import dyhead
        from mmengine.registry import MODELS
        from mmcv.cnn import build_conv_layer
        assert "mmdcnv2.mmcv_ops" not in sys.modules
        assert mmcv.ops.DeformConv2d.__module__ == "mmcv.ops.deform_conv"
        assert reppoints_head.DeformConv2d is mmcv.ops.DeformConv2d
        assert type(build_conv_layer(dict(type="DCNv2"), 4, 4, 3)).__module__ == "mmcv.ops.modulated_deform_conv"
        from mmengine.config import Config
        cfg = Config.fromfile({str(cfg)!r})
        cfg = Config.fromfile({str(cfg)!r})   # imported again: no second redirect, no second log
        import mmdcnv2.mmcv_ops as m
        assert m.is_redirected()
        checks = [mmcv.ops.DeformConv2d is m.DeformConv2d, mmcv.ops.deform_conv2d is m.deform_conv2d,
                  mmcv.ops.deform_conv.deform_conv2d is m.deform_conv2d, saconv.deform_conv2d is m.deform_conv2d,
                  mmcv.ops.modulated_deform_conv.ModulatedDeformConv2d is m.ModulatedDeformConv2d,
                  mmcv.ops.ModulatedDeformRoIPoolPack is m.ModulatedDeformRoIPoolPack,
                  mmcv.ops.deform_roi_pool is m.deform_roi_pool,
                  reppoints_head.DeformConv2d is m.DeformConv2d, tood_head.deform_conv2d is m.deform_conv2d,
                  dyhead.ModulatedDeformConv2d is m.ModulatedDeformConv2d,
                  atss_vlfusion_head.ModulatedDeformConv2d is m.ModulatedDeformConv2d,
                  MODELS.get("DCN") is m.DeformConv2dPack, MODELS.get("DCNv2") is m.ModulatedDeformConv2dPack,
                  type(build_conv_layer(cfg.conv, 4, 4, 3)) is m.ModulatedDeformConv2dPack]
        print("CHECKS", checks)
        assert all(checks)
    """)
    assert out.returncode == 0, out.stdout + out.stderr
    logs = (out.stdout + out.stderr).count("mmcv's deformable ops now run on mmdcnv2's kernels")
    assert logs == 1, out.stdout + out.stderr


def test_redirect_reports_and_restore_undoes(switch, mmcv_original):
    from mmdet.models.dense_heads import reppoints_head, tood_head

    assert not switch.is_redirected()
    assert mmcv.ops.DeformConv2d is mmcv_original["DeformConv2d"]
    old_layer = mmcv.ops.DeformConv2dPack(4, 4, 3, padding=1)  # built before the switch
    replaced = switch.redirect()
    for where in [
        "mmcv.ops.DeformConv2d",
        "mmcv.ops.deform_conv.deform_conv2d",
        "mmcv.ops.saconv.deform_conv2d",
        "mmcv.ops.modulated_deform_conv.ModulatedDeformConv2dPack",
        "mmcv.ops.deform_roi_pool.DeformRoIPool",
        "mmdet.models.dense_heads.reppoints_head.DeformConv2d",
        "mmdet.models.dense_heads.tood_head.deform_conv2d",
        "mmdet.models.necks.dyhead.ModulatedDeformConv2d",
    ]:
        assert where in replaced["modules"], where
    assert {"mmengine::model.DCN", "mmengine::model.DCNv2"} <= set(replaced["registry"])
    assert switch.redirect() == {"modules": [], "registry": []}  # idempotent
    assert reppoints_head.DeformConv2d is switch.DeformConv2d

    # a module imported while the switch is on takes ours from mmcv.ops; restore() puts mmcv's back there too
    late = types.ModuleType("late_user_module")
    sys.modules["late_user_module"] = late
    try:
        exec("from mmcv.ops import DeformConv2d, deform_conv2d", late.__dict__)
        assert late.DeformConv2d is switch.DeformConv2d
        new_layer = MODELS.build(dict(type="DCN", in_channels=4, out_channels=4, kernel_size=3, padding=1))
        assert isinstance(new_layer, switch.DeformConv2dPack)
        # a layer built before the switch runs on our kernels too (its module's function is ours)
        x = torch.randn(1, 4, 6, 6)
        with torch.no_grad():
            old_layer.conv_offset.weight.normal_(0, 0.1)
            y_ours = old_layer(x)
        switch.restore()
        assert late.DeformConv2d is mmcv_original["DeformConv2d"]
        assert late.deform_conv2d is mmcv_original["deform_conv2d"]
    finally:
        del sys.modules["late_user_module"]
    assert not switch.is_redirected()
    for name, original in mmcv_original.items():
        assert getattr(mmcv.ops, name) is original, name
    assert tood_head.deform_conv2d is mmcv_original["deform_conv2d"]
    assert ROOT_MODELS.get("DCN") is mmcv_original["DeformConv2dPack"]
    assert type(build_conv_layer(dict(type="DCNv2"), 4, 4, 3)) is mmcv_original["ModulatedDeformConv2dPack"]
    with torch.no_grad():
        torch.testing.assert_close(old_layer(x), y_ours, rtol=1e-5, atol=1e-5)  # mmcv's kernel again
    assert isinstance(new_layer, switch.DeformConv2dPack)  # built while on: stays ours


def _offset(n, dg, k, h, w, scale=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 2 * dg * k, h, w, generator=g) - 0.5) * 2 * scale


@pytest.mark.parametrize(
    "groups,deform_groups,stride,padding,dilation", [(1, 1, 1, 1, 1), (2, 2, 2, 1, 1), (4, 1, 1, 2, 2), (1, 4, 1, 0, 1)]
)
def test_functions_have_mmcv_signatures_and_values(mmcv_original, groups, deform_groups, stride, padding, dilation):
    from mmdcnv2 import mmcv_ops

    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 10, dtype=torch.float64)
    w = torch.randn(6 if groups != 4 else 8, 8 // groups, 3, 3, dtype=torch.float64)
    ho = (9 + 2 * padding - dilation * 2 - 1) // stride + 1
    wo = (10 + 2 * padding - dilation * 2 - 1) // stride + 1
    off = _offset(2, deform_groups, 9, ho, wo).double()
    mask = torch.rand(2, deform_groups * 9, ho, wo, dtype=torch.float64)
    bias = torch.randn(w.shape[0], dtype=torch.float64)
    args = (stride, padding, dilation, groups, deform_groups)
    # float64 on mmcv's CPU kernels (and ours): values and gradients
    leaves = [t.clone().requires_grad_() for t in (x, off, w)]
    ref = mmcv_original["deform_conv2d"](*leaves, *args)
    ref.sum().backward()
    ours_leaves = [t.clone().requires_grad_() for t in (x, off, w)]
    got = mmcv_ops.deform_conv2d(*ours_leaves, *args)  # positional, as TOOD and SAC call it
    got.sum().backward()
    torch.testing.assert_close(got, ref)
    for a, b in zip(ours_leaves, leaves):
        torch.testing.assert_close(a.grad, b.grad)

    ref = mmcv_original["modulated_deform_conv2d"](x, off, mask, w, bias, *args)
    got = mmcv_ops.modulated_deform_conv2d(x, off, mask, w, bias, *args)
    torch.testing.assert_close(got, ref)


def test_modulated_offset_larger_than_output_read_as_mmcv(mmcv_original):
    """DyHead gives its upper-level conv the offsets and mask of the middle level (twice the output's size,
    a channel slice); mmcv's kernel reads each image's first values as an output-sized map: same values
    and gradients here."""
    from mmdcnv2 import mmcv_ops

    torch.manual_seed(0)
    x = torch.randn(2, 4, 4, 5, dtype=torch.float64)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    bias = torch.randn(6, dtype=torch.float64)
    base = torch.randn(2, 27, 8, 10, dtype=torch.float64)  # DyHead's offset-and-mask conv, middle level

    def run(fn):
        b = base.clone().requires_grad_()
        out = fn(x, b[:, :18], b[:, 18:].sigmoid(), w, bias, 1, 1, 1, 1, 1)
        out.square().sum().backward()
        return out, b.grad

    (ref, ref_grad), (got, got_grad) = (
        run(mmcv_original["modulated_deform_conv2d"]),
        run(mmcv_ops.modulated_deform_conv2d),
    )
    assert got.shape == (2, 6, 4, 5)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_grad, ref_grad)
    with pytest.raises(ValueError, match="offset of shape"):
        mmcv_ops.modulated_deform_conv2d(x, base[:, :18, :2, :2], base[:, 18:, :4, :5], w, bias, 1, 1, 1, 1, 1)


def test_functions_refuse_what_mmcv_refuses_with_named_arguments():
    from mmdcnv2 import mmcv_ops

    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 2, 3, 3)
    off = torch.zeros(1, 18, 3, 3)
    with pytest.raises(ValueError, match="groups=1"):
        mmcv_ops.deform_conv2d(x, off, w, 1, 0, 1, 1, 1)  # weight says groups=2
    with pytest.raises(ValueError, match="deform_groups=2"):
        mmcv_ops.deform_conv2d(x, off, w, 1, 0, 1, 2, 2)
    with pytest.raises(ValueError, match="bias"):
        mmcv_ops.deform_conv2d(x, off, w, 1, 0, 1, 2, 1, True)


def test_deform_roi_pool_function_mmcv_signature():
    from mmdcnv2 import mmcv_ops

    torch.manual_seed(0)
    feat = torch.randn(2, 3, 12, 14)
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 18.0], [1, 4.0, 0.0, 9.5, 30.0]])
    got = mmcv_ops.deform_roi_pool(feat, rois, None, (3, 4), 0.5, 2, 0.1)
    ref = roi_align(feat, rois, (3, 4), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "name,args,kwargs",
    [
        ("DeformConv2d", (8, 6, 3), dict(stride=1, padding=1, deform_groups=2)),
        ("DeformConv2dPack", (8, 6, 3), dict(stride=2, padding=1, deform_groups=2)),
        ("ModulatedDeformConv2d", (8, 6, 3), dict(padding=2, dilation=2, groups=2)),
        ("ModulatedDeformConv2dPack", (8, 6, (3, 1)), dict(padding=(1, 0), deform_groups=4)),
    ],
)
def test_classes_match_mmcv(mmcv_original, name, args, kwargs):
    """State dicts key for key, strict loading both ways, same outputs and gradients on mmcv's CPU kernel."""
    from mmdcnv2 import mmcv_ops

    torch.manual_seed(0)
    theirs = mmcv_original[name](*args, **kwargs)
    ours = getattr(mmcv_ops, name)(*args, **kwargs)
    sd = theirs.state_dict()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in sd.items()}
    if hasattr(theirs, "conv_offset"):
        with torch.no_grad():
            theirs.conv_offset.weight.normal_(0, 0.1)
            theirs.conv_offset.bias.normal_(0, 0.5)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 8, 7, 9)
    extra = []
    if "Pack" not in name:
        k = theirs.kernel_size[0] * theirs.kernel_size[1] * theirs.deform_groups
        probe = torch.nn.functional.conv2d(
            x,
            torch.zeros(1, 8, *theirs.kernel_size),
            stride=theirs.stride,
            padding=theirs.padding,
            dilation=theirs.dilation,
        )
        ho, wo = probe.shape[2:]
        extra.append(_offset(2, theirs.deform_groups, theirs.kernel_size[0] * theirs.kernel_size[1], ho, wo))
        if "Modulated" in name:
            extra.append(torch.rand(2, k, ho, wo))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = theirs(xa, *extra), ours(xb, *extra)
    torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-4)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-4)
    for (n, pa), (_, pb) in zip(theirs.named_parameters(), ours.named_parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-4, atol=1e-3, msg=lambda m, n=n: f"{n}: {m}")


def test_deform_conv2d_input_smaller_than_kernel_as_mmcv(mmcv_original):
    """mmcv pads an input smaller than the kernel and crops the output; ours does the same."""
    from mmdcnv2 import mmcv_ops

    torch.manual_seed(0)
    theirs = mmcv_original["DeformConv2d"](4, 4, 3, padding=1)
    ours = mmcv_ops.DeformConv2d(4, 4, 3, padding=1)
    ours.load_state_dict(theirs.state_dict())
    x, off = torch.randn(1, 4, 2, 1), _offset(1, 1, 9, 2, 1, scale=0.7)
    torch.testing.assert_close(ours(x, off), theirs(x, off), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["DeformRoIPoolPack", "ModulatedDeformRoIPoolPack"])
def test_roi_pool_classes_state_dicts_as_mmcv(mmcv_original, name):
    from mmdcnv2 import mmcv_ops

    theirs = mmcv_original[name](7, 16, deform_fc_channels=32, spatial_scale=0.25)
    ours = getattr(mmcv_ops, name)(7, 16, deform_fc_channels=32, spatial_scale=0.25)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    out = ours(torch.randn(1, 16, 10, 10), torch.tensor([[0, 2.0, 2.0, 30.0, 20.0]]))
    assert out.shape == (1, 16, 7, 7)


# --- mmcv's spellings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls", [ops.DeformConv2d, ops.DeformConv2dPack, ops.ModulatedDeformConv2d, ops.ModulatedDeformConv2dPack]
)
def test_deformable_groups_accepted_with_mmcv_warning(mmcv_original, cls):
    with pytest.warns(DeprecationWarning) as ours_warned:
        layer = cls(8, 8, 3, padding=1, deformable_groups=2)
    assert layer.deform_groups == 2
    with pytest.warns(DeprecationWarning) as mmcv_warned:
        mmcv_original[cls.__name__](8, 8, 3, padding=1, deformable_groups=2)
    assert [str(w.message) for w in ours_warned] == [str(w.message) for w in mmcv_warned]
    with pytest.raises(TypeError, match="deformable_groups"):
        cls(8, 8, 3, deform_groups=2, deformable_groups=2)


def test_deformable_groups_through_the_registry():
    """SOLOv2's dcn_cfg spelling, through mmcv's conv builder, in our scope."""
    with pytest.warns(DeprecationWarning, match="deformable_groups"):
        layer = build_conv_layer(dict(type="mmdcnv2.DCNv2", deformable_groups=2), 8, 8, 3, padding=1)
    assert layer.deform_groups == 2 and layer.conv_offset.out_channels == 2 * 27


def _old_style(state_dict, packs):
    """A state dict as mmcv < 2 saved it: `<name>_offset.*` beside the layer, module version 1."""
    old = type(state_dict)()
    old._metadata = type(state_dict._metadata)((k, dict(v)) for k, v in state_dict._metadata.items())
    for key, value in state_dict.items():
        for pack in packs:
            if key.startswith(pack + ".conv_offset."):
                key = pack + "_offset." + key[len(pack + ".conv_offset.") :]
                break
        old[key] = value
    for pack in packs:
        old._metadata[pack]["version"] = 1
    return old


@pytest.mark.parametrize("dcn", ["mmdcnv2.DCN", "mmdcnv2.DCNv2", "mmcv_ops"])
def test_old_checkpoint_keys_renamed(tmp_path, dcn, request):
    """An mmdet ResNet-50 with DCN in c3-c5 loads a pre-2.0 state dict (`layerX.Y.conv2_offset.*`) strictly,
    with torch's load_state_dict and with mmengine's load_checkpoint, to the same weights."""
    if dcn == "mmcv_ops":
        request.getfixturevalue("switch")
        dcn = "DCNv2"
    cfg = dict(
        type="ResNet",
        depth=50,
        num_stages=4,
        out_indices=(3,),
        dcn=dict(type=dcn, deform_groups=1),
        stage_with_dcn=(False, True, True, True),
    )
    torch.manual_seed(0)
    src = MODELS.build(cfg)
    with torch.no_grad():
        for m in src.modules():
            if hasattr(m, "conv_offset"):
                m.conv_offset.weight.normal_(0, 0.01)
                m.conv_offset.bias.normal_(0, 0.1)
    sd = src.state_dict()
    packs = sorted({k[: -len(".conv_offset.weight")] for k in sd if k.endswith(".conv_offset.weight")})
    assert len(packs) == 4 + 6 + 3  # c3-c5 of ResNet-50
    assert all(sd._metadata[p]["version"] == 2 for p in packs)
    old = _old_style(sd, packs)
    assert "layer2.0.conv2_offset.weight" in old and "layer2.0.conv2.conv_offset.weight" not in old
    path = tmp_path / "old.pth"
    torch.save(dict(state_dict=old), path)

    for how in ("torch", "mmengine"):
        torch.manual_seed(1)
        dst = MODELS.build(cfg)
        if how == "torch":
            dst.load_state_dict(old, strict=True)
        else:
            load_checkpoint(dst, str(path), map_location="cpu", strict=True)
        for key, value in dst.state_dict().items():
            torch.testing.assert_close(value, sd[key], rtol=0, atol=0, msg=lambda m, key=key: f"{how} {key}: {m}")

    # a current (version 2) state dict is never renamed: a stray old-style key stays unexpected
    stray = type(sd)(sd)
    stray._metadata = sd._metadata
    stray["layer2.0.conv2_offset.weight"] = stray["layer2.0.conv2.conv_offset.weight"].clone()
    with pytest.raises(RuntimeError, match="conv2_offset"):
        MODELS.build(cfg).load_state_dict(stray, strict=True)


# --- the mmdcnv2 scope ------------------------------------------------------------------------------------


def test_scoped_name_we_do_not_have_raises_naming_type_and_scope():
    """`mmdcnv2.<Name>` means ours: a name we do not have raises (never mmcv's or mmdet's class of that name)."""
    for build in (
        lambda: build_conv_layer(dict(type="mmdcnv2.SAC"), 4, 4, 3),  # mmcv has SAC
        lambda: MODELS.build(dict(type="mmdcnv2.ResNet", depth=50)),  # mmdet has ResNet
        lambda: build_conv_layer(dict(type="mmdcnv2.DCNv3"), 4, 4, 3),
    ):
        with pytest.raises(KeyError) as err:
            build()
        assert "mmdcnv2" in str(err.value)
    with pytest.raises(KeyError, match="'SAC' is not a type of the scope 'mmdcnv2'"):
        build_conv_layer(dict(type="mmdcnv2.SAC"), 4, 4, 3)
    # in a whole model, deep inside the backbone
    cfg = dict(
        type="RetinaNet",
        backbone=dict(
            type="ResNet", depth=50, dcn=dict(type="mmdcnv2.DCNv3"), stage_with_dcn=(False, True, True, True)
        ),
        neck=dict(type="FPN", in_channels=[256, 512, 1024, 2048], out_channels=32, num_outs=5),
        bbox_head=dict(type="RetinaHead", num_classes=3, in_channels=32),
    )
    with pytest.raises(KeyError, match="'DCNv3' is not a type of the scope 'mmdcnv2'"):
        MODELS.build(cfg)
    # ours resolve, and unscoped names in our scope fall back to mmdet's and mmcv's as usual
    assert type(build_conv_layer(dict(type="mmdcnv2.DCNv2"), 4, 4, 3)).__module__ == "mmdcnv2.models.layers.dcn"
    assert MODELS.build(dict(type="ResNet", depth=18, _scope_="mmdcnv2")).__class__.__name__ == "ResNet"
    from mmdcnv2.registry import MODELS as OUR_MODELS

    assert "mmdcnv2.DCNv2" in MODELS and "mmdcnv2.DCNv2" in OUR_MODELS and "mmdcnv2.SAC" not in OUR_MODELS


def test_scope_has_every_mmdet_registry():
    from mmdet import registry as mmdet_registry

    from mmdcnv2 import registry

    for name, reg in vars(mmdet_registry).items():
        if type(reg).__name__ == "Registry" and reg.scope == "mmdet":
            ours = getattr(registry, name)
            assert ours.parent is reg and ours.scope == "mmdcnv2", name
            assert reg._search_child("mmdcnv2") is ours, name


def test_glip_deformable_fusion_on_our_ops():
    """GLIP cannot be built here (its language model comes from HuggingFace), but its deformable part can:
    the DyConv of its fusion head (Conv3x3Norm with mmcv's ModulatedDeformConv2d, offsets of the middle
    level also given to the levels above and below) runs on our ops with the switch, as mmcv's does."""
    import importlib

    from mmdet.models.dense_heads import atss_vlfusion_head as glip

    from mmdcnv2 import mmcv_ops

    def make():
        torch.manual_seed(0)
        return glip.DyConv(
            lambda i, o, s: glip.Conv3x3Norm(i, o, s, use_dcn=True, norm_type=["gn", 16]),
            32,
            32,
            use_dyfuse=True,
            use_dcn=True,
        ).eval()

    mmcv_ops.restore()
    try:
        theirs = make()
        mmcv_ops.redirect()
        ours = make()
        assert all(type(c.conv) is mmcv_ops.ModulatedDeformConv2d for c in ours.dyconvs)
        with torch.no_grad():
            theirs.offset.weight.normal_(0, 0.02)
            theirs.offset.bias.normal_(0, 0.5)
        ours.load_state_dict(theirs.state_dict(), strict=True)
        feats = [torch.randn(2, 32, 16, 16), torch.randn(2, 32, 8, 8), torch.randn(2, 32, 4, 4)]
        ext = importlib.import_module("mmcv.ops.modulated_deform_conv").ext_module
        saved = ext.modulated_deform_conv_forward

        def refuse(*args, **kwargs):
            raise AssertionError("mmcv's kernel ran")

        ext.modulated_deform_conv_forward = refuse
        try:
            with torch.no_grad():
                got = ours({"visual": feats, "lang": None})["visual"]
        finally:
            ext.modulated_deform_conv_forward = saved
        mmcv_ops.restore()
        with torch.no_grad():
            want = theirs({"visual": feats, "lang": None})["visual"]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    finally:
        mmcv_ops.restore()
