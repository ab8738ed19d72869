"""torch.export and ONNX export: exported programs match eager mode; our deformable convolution
becomes the standard ONNX DeformConv and onnxruntime's outputs match PyTorch's; deformable RoI
pooling refuses to export with an error that names it."""

import numpy as np
import pytest
import torch
from torch import nn

from mmdcnv2.ops import (
    DeformConv2dPack,
    DeformRoIPoolPack,
    ModulatedDeformConv2dPack,
    ModulatedDeformRoIPoolPack,
    UnsupportedONNXOperatorError,
    deform_conv2d,
    export_onnx,
)

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

try:
    import onnxscript  # noqa: F401

    EXPORTERS = ["torchscript", "dynamo"]
except ImportError:  # the dynamo exporter needs onnxscript
    EXPORTERS = ["torchscript"]


def _randomise_offsets(model: nn.Module, std: float = 0.5) -> nn.Module:
    """Pack modules start with zero offsets: give them real ones so the test sees deformation."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if hasattr(m, "conv_offset"):
            with torch.no_grad():
                m.conv_offset.weight.copy_(torch.randn(m.conv_offset.weight.shape, generator=g) * std)
                m.conv_offset.bias.copy_(torch.randn(m.conv_offset.bias.shape, generator=g) * std)
    return model


def _backbone():
    pytest.importorskip("mmdet")
    import mmdcnv2  # noqa: F401  (registers)
    from mmdet.utils import register_all_modules

    from mmdcnv2.registry import MODELS

    register_all_modules()
    bb = MODELS.build(
        dict(type="mmdcnv2.DCNResNet", depth=18, base_channels=16, stage_dcn=(None, "DCNv2", "DCNv2", "DCNv2"))
    )
    bb.eval()
    return _randomise_offsets(bb, std=0.05)


# --- torch.export ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: ModulatedDeformConv2dPack(8, 12, 3, padding=1, deform_groups=2),
        lambda: DeformConv2dPack(8, 12, 3, stride=2, padding=2, dilation=2, groups=2),
    ],
)
def test_torch_export_modules_match_eager(make):
    model = _randomise_offsets(make().eval())
    x = torch.randn(2, 8, 11, 13)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.mmdcnv2.deform_conv2d.default in targets
    for inp in (x, torch.randn(3, 8, 11, 13)):  # another batch size and other values
        torch.testing.assert_close(ep.module()(inp), model(inp), rtol=0, atol=0)


def test_torch_export_backbone_matches_eager():
    bb = _backbone()
    x = torch.randn(1, 3, 64, 64)
    ep = torch.export.export(bb, (x,))
    n_dcn = sum(n.target == torch.ops.mmdcnv2.deform_conv2d.default for n in ep.graph.nodes)
    assert n_dcn == 6  # two BasicBlocks in each of c3, c4, c5
    x2 = torch.randn(1, 3, 64, 64)
    for got, want in zip(ep.module()(x2), bb(x2)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torch_export_roi_pool_matches_eager():
    model = ModulatedDeformRoIPoolPack(7, 8, deform_fc_channels=16, spatial_scale=0.5).eval()
    with torch.no_grad():
        model.offset_fc[-1].weight.normal_(0, 0.1)
    feat = torch.randn(2, 8, 16, 16)
    rois = torch.tensor([[0, 1.0, 2.0, 20.0, 25.0], [1, 4.0, 0.0, 30.0, 12.0]])
    ep = torch.export.export(model, (feat, rois))
    torch.testing.assert_close(ep.module()(feat, rois), model(feat, rois), rtol=0, atol=0)


# --- ONNX -----------------------------------------------------------------------------------------


class _Functional(nn.Module):
    """deform_conv2d with its offset (and mask) as graph inputs, so the test chooses them."""

    def __init__(self, cin, cout, k, stride, padding, dilation, groups, bias, mask):
        super().__init__()
        kh, kw = (k, k) if isinstance(k, int) else k
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, kh, kw))
        self.bias = nn.Parameter(torch.randn(cout)) if bias else None
        self.conf = (stride, padding, dilation)
        self.use_mask = mask

    def forward(self, x, offset, mask):
        return deform_conv2d(x, offset, self.weight, self.bias, *self.conf, mask=mask if self.use_mask else None)


def _run_ort(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})


# (cin, cout, kernel, stride, padding, dilation, groups, deform_groups, H, W)
CASES = [
    (4, 6, 3, 1, 1, 1, 1, 1, 7, 8),
    (4, 6, 3, 2, 0, 1, 2, 1, 9, 9),
    (6, 4, 3, 1, 2, 2, 1, 3, 8, 7),
    (8, 8, (2, 3), (2, 1), (1, 0), (1, 2), 4, 2, 6, 9),
    (3, 5, 1, 1, 0, 1, 1, 1, 5, 5),
]


def _inputs(case, offsets, seed=0):
    cin, cout, k, stride, padding, dilation, groups, dg, H, W = case
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, H, W, generator=g)
    shape = (2, 2 * dg * kh * kw, Ho, Wo)
    if offsets == "fractional":
        off = torch.randn(shape, generator=g) * 2
    elif offsets == "integer":  # samples exactly on pixels and on the map's border
        off = torch.randint(-3, 4, shape, generator=g).float()
    else:  # "far": many samples far outside, some straddling the border
        off = torch.randn(shape, generator=g) * 2 + torch.randint(-1, 2, shape, generator=g).float() * max(H, W)
    mask = torch.rand(2, dg * kh * kw, Ho, Wo, generator=g)
    return x, off, mask


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mask,bias", [(True, True), (True, False), (False, True), (False, False)])
def test_onnx_deform_conv_matches_pytorch(tmp_path, exporter, case, mask, bias):
    if exporter == "dynamo" and case not in CASES[:2] + CASES[3:4]:
        pytest.skip("the dynamo exporter takes about a second per model: a subset of the cases")
    cin, cout, k, stride, padding, dilation, groups, dg, H, W = case
    model = _Functional(cin, cout, k, stride, padding, dilation, groups, bias, mask).eval()
    x, off, m = _inputs(case, "fractional")
    path = tmp_path / "dcn.onnx"
    proto = export_onnx(model, (x, off, m), path, exporter=exporter, input_names=["x", "offset", "mask"])
    nodes = [n for n in proto.graph.node if n.op_type == "DeformConv"]
    assert len(nodes) == 1 and not any(n.domain for n in proto.graph.node)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs["group"] == groups and attrs["offset_group"] == dg
    onnx.checker.check_model(proto, full_check=True)
    with torch.no_grad():
        for offsets in ("fractional", "integer", "far"):
            x, off, m = _inputs(case, offsets, seed=1)
            (got,) = _run_ort(path, {"x": x, "offset": off, "mask": m})
            want = model(x, off, m)
            np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4, err_msg=offsets)


@pytest.mark.parametrize(
    "exporter,opset",
    [("torchscript", 19), ("torchscript", 20)] + [("dynamo", 19), ("dynamo", 22)] * ("dynamo" in EXPORTERS),
)
@pytest.mark.parametrize(
    "make",
    [
        lambda: ModulatedDeformConv2dPack(8, 12, 3, padding=1, deform_groups=2),
        lambda: DeformConv2dPack(8, 12, 3, stride=2, padding=1, groups=2, deform_groups=4),
    ],
)
def test_onnx_pack_modules(tmp_path, exporter, opset, make):
    model = _randomise_offsets(make().eval())
    x = torch.randn(1, 8, 10, 12)
    path = tmp_path / "pack.onnx"
    proto = export_onnx(model, (x,), path, opset=opset, exporter=exporter, input_names=["x"])
    assert proto.opset_import[0].version == opset
    assert [n.op_type for n in proto.graph.node].count("DeformConv") == 1
    with torch.no_grad():
        x2 = torch.randn(1, 8, 10, 12)
        (got,) = _run_ort(path, {"x": x2})
        np.testing.assert_allclose(got, model(x2).numpy(), rtol=1e-4, atol=1e-4)


def test_onnx_dynamic_batch_torchscript(tmp_path):
    model = _randomise_offsets(ModulatedDeformConv2dPack(4, 4, 3, padding=1).eval())
    path = tmp_path / "dyn.onnx"
    export_onnx(
        model,
        (torch.randn(1, 4, 9, 9),),
        path,
        exporter="torchscript",
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    x = torch.randn(3, 4, 9, 9)
    (got,) = _run_ort(path, {"x": x})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif("dynamo" not in EXPORTERS, reason="needs onnxscript")
def test_onnx_backbone_dynamo(tmp_path):
    bb = _backbone()
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "backbone.onnx"
    proto = export_onnx(bb, (x,), path, exporter="dynamo")
    assert [n.op_type for n in proto.graph.node].count("DeformConv") == 6
    x2 = torch.randn(1, 3, 64, 64)
    got = _run_ort(path, {proto.graph.input[0].name: x2})
    with torch.no_grad():
        for g, w in zip(got, bb(x2)):
            np.testing.assert_allclose(g, w.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("cls", [DeformRoIPoolPack, ModulatedDeformRoIPoolPack])
def test_onnx_roi_pool_is_a_clear_error(tmp_path, exporter, cls):
    model = cls(7, 8, deform_fc_channels=16).eval()
    feat = torch.randn(1, 8, 16, 16)
    rois = torch.tensor([[0, 1.0, 1.0, 12.0, 14.0]])
    with pytest.raises(UnsupportedONNXOperatorError, match="mmdcnv2.deform_roi_pool"):
        export_onnx(model, (feat, rois), tmp_path / "pool.onnx", exporter=exporter)


def test_onnx_bad_arguments(tmp_path):
    model = ModulatedDeformConv2dPack(4, 4, 3, padding=1).eval()
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, (x,), tmp_path / "a.onnx", opset=18)
    with pytest.raises(ValueError, match="exporter"):
        export_onnx(model, (x,), tmp_path / "a.onnx", exporter="jit")
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, (x,), tmp_path / "a.onnx", opset=22, exporter="torchscript")
    with pytest.raises(ValueError, match="dynamic_axes"):
        export_onnx(model, (x,), tmp_path / "a.onnx", exporter="dynamo", dynamic_axes={"x": {0: "b"}})


# --- plain torch.onnx.export, no extra arguments (import mmdcnv2 registered our translations) ------


def _plain_export(model, args, path, **kwargs):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(model, args, str(path), **kwargs)
    return onnx.load(str(path))


def _assert_standard_deform_conv(proto, count):
    assert [n.op_type for n in proto.graph.node].count("DeformConv") == count
    assert not any(n.domain for n in proto.graph.node)  # standard ONNX only: no plugin domain
    onnx.checker.check_model(proto, full_check=True)


@pytest.mark.skipif("dynamo" not in EXPORTERS, reason="needs onnxscript")
def test_plain_onnx_export_backbone(tmp_path):
    bb = _backbone()
    x = torch.randn(1, 3, 64, 64)
    proto = _plain_export(bb, (x,), tmp_path / "backbone.onnx", opset_version=19)
    _assert_standard_deform_conv(proto, 6)  # two BasicBlocks in each of c3, c4, c5
    assert proto.opset_import[0].version == 19
    x2 = torch.randn(1, 3, 64, 64)
    got = _run_ort(tmp_path / "backbone.onnx", {proto.graph.input[0].name: x2})
    with torch.no_grad():
        want = bb(x2)
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize(
    "kwargs",
    [dict(opset_version=19), dict(), dict(opset_version=22)] * ("dynamo" in EXPORTERS)
    + [dict(opset_version=19, dynamo=False)],
    ids=lambda k: "-".join(f"{a}={b}" for a, b in k.items()) or "defaults",
)
@pytest.mark.parametrize(
    "make",
    [
        lambda: ModulatedDeformConv2dPack(8, 12, 3, padding=1, deform_groups=2),
        lambda: DeformConv2dPack(8, 12, 3, stride=2, padding=1, groups=2, deform_groups=4),  # no mask, no bias
    ],
    ids=["mdconv", "dconv"],
)
def test_plain_onnx_export_modules(tmp_path, kwargs, make):
    model = _randomise_offsets(make().eval())
    x = torch.randn(2, 8, 10, 12)
    proto = _plain_export(model, (x,), tmp_path / "m.onnx", **kwargs)
    _assert_standard_deform_conv(proto, 1)
    node = next(n for n in proto.graph.node if n.op_type == "DeformConv")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["group"] == model.groups and attrs["offset_group"] == model.deform_groups
    x2 = torch.randn(2, 8, 10, 12)
    (got,) = _run_ort(tmp_path / "m.onnx", {proto.graph.input[0].name: x2})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x2).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dynamo", [True] * ("dynamo" in EXPORTERS) + [False])
def test_plain_onnx_export_needs_opset_19(tmp_path, dynamo):
    model = ModulatedDeformConv2dPack(4, 4, 3, padding=1).eval()
    with pytest.raises(Exception, match="DeformConv, which needs opset_version >= 19"):
        _plain_export(model, (torch.randn(1, 4, 8, 8),), tmp_path / "a.onnx", opset_version=17, dynamo=dynamo)


def _causes(e):
    while e is not None:
        yield e
        e = e.__cause__ or e.__context__


@pytest.mark.parametrize("opset", [17, 19])
@pytest.mark.parametrize("dynamo", [True] * ("dynamo" in EXPORTERS) + [False])
@pytest.mark.parametrize("cls", [DeformRoIPoolPack, ModulatedDeformRoIPoolPack])
def test_plain_onnx_export_roi_pool_is_a_clear_error(tmp_path, dynamo, cls, opset):
    model = cls(7, 8, deform_fc_channels=16).eval()
    args = (torch.randn(1, 8, 16, 16), torch.tensor([[0, 1.0, 1.0, 12.0, 14.0]]))
    with pytest.raises(Exception, match="mmdcnv2.deform_roi_pool") as info:
        _plain_export(model, args, tmp_path / "pool.onnx", opset_version=opset, dynamo=dynamo)
    assert any(isinstance(e, UnsupportedONNXOperatorError) for e in _causes(info.value))
    assert not (tmp_path / "pool.onnx").exists()


def test_import_does_not_load_the_exporters(tmp_path):
    """The registration is lazy: `import mmdcnv2` imports neither torch.onnx nor onnxscript nor the dynamo
    exporter's registry; once the exporters are imported (later, in the same process) they find ours."""
    import subprocess
    import sys

    code = f"""
import sys, warnings, mmdcnv2, torch, onnx
heavy = [m for m in ('torch.onnx', 'onnxscript', 'torch.onnx._internal.exporter._torchlib.ops') if m in sys.modules]
assert not heavy, heavy
model = mmdcnv2.ops.ModulatedDeformConv2dPack(4, 4, 3, padding=1).eval()
warnings.simplefilter('ignore')
torch.onnx.export(model, (torch.randn(1, 4, 8, 8),), {str(tmp_path / "ts.onnx")!r}, opset_version=19, dynamo=False)
assert [n.op_type for n in onnx.load({str(tmp_path / "ts.onnx")!r}).graph.node].count('DeformConv') == 1
"""
    if "dynamo" in EXPORTERS:
        code += """
from torch.onnx._internal.exporter import _registration
r = _registration.ONNXRegistry.from_torchlib(opset_version=19)
assert r.is_registered(torch.ops.mmdcnv2.deform_conv2d.default)
assert r.is_registered(torch.ops.mmdcnv2.deform_roi_pool.default)
"""
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
