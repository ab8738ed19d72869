"""Every mmdetection 3.3.0 model that uses deformable convolution or deformable RoI pooling, built from
mmdet's own config files, on mmdcnv2's kernels.

For each config below (every config of the installed mmdet whose resolved model turns DCN, SAC with
deformable offsets, FoveaBox's deformable alignment or deformable RoI pooling on, plus the base config of
each family whose head or neck calls mmcv's deformable ops from its code), one model is built with
mmcv's own ops (A) and one with ``mmdcnv2.mmcv_ops`` switched on (B), and:

- B holds no mmcv deformable layer, and the same deformable layers (by name and class name) as A;
- the state dicts of A and B match key for key and shape for shape and load strictly both ways;
- B runs one training step (losses, backward) and one prediction with mmcv's deformable kernels made to
  raise, and mmdcnv2's ops (forward and backward) are seen running at the dispatcher;
- where mmcv has a CPU kernel (its deformable convolutions; its RoI pooling is CUDA-only) the outputs of
  every deformable layer, of the backbone, neck and heads are those of A, with the same weights and offsets
  made non-zero (so that the sampling really is deformed);
- built with ``_scope_='mmdcnv2'`` and without the switch, the model builds with no registry warning, and it
  still holds mmcv deformable layers (or calls mmcv's functional op) exactly for the families that need
  the switch.

Configs sharing one model (schedules, datasets, or depths we shrink to 50) are checked once. What we change
to run them on a CPU in seconds is in ``shrink`` (depth 101 -> 50, pretrained weights off, ...).
"""

import contextlib
import copy
import glob
import importlib
import json
import logging
import os
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import pytest
import torch

pytest.importorskip("mmdet")

import mmdet  # noqa: E402
from mmengine.config import Config, ConfigDict  # noqa: E402
from mmengine.logging import MessageHub, MMLogger  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.testing import demo_mm_inputs  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402

import mmdcnv2  # noqa: E402,F401
from mmdcnv2 import ops as our_ops  # noqa: E402

register_all_modules()
CONFIGS = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs")


@dataclass
class Case:
    config: str  # relative to mmdet's configs/
    family: str
    needs_redirect: bool  # some deformable op is out of reach of any config (needs mmdcnv2.mmcv_ops)
    tweak: Optional[Callable] = None  # a change without which it cannot run here (said in the README)
    why: str = ""
    no_predict: str = ""  # why it cannot predict on a CPU (the comparisons then use the training pass)


def _yolox_dcn(model):
    model.bbox_head.dcn_on_last_conv = True  # no YOLOX config turns it on; the head hard-codes 'DCNv2'


def _ld_teacher(model):
    # the teacher is named by a path relative to mmdet's repository and loads a checkpoint from the web
    model.teacher_config = os.path.join(CONFIGS, model.teacher_config.replace("configs/", "", 1))
    model.teacher_ckpt = None


def _one_hourglass(model):
    # Hourglass-104 has two stacks; one keeps the same layers (CentripetalHead's DeformConv2d per stack)
    model.backbone.num_stacks = 1
    model.bbox_head.num_feat_levels = 1


R, D = True, False  # needs the redirect, or not
GA_NO_PREDICT = (
    "its prediction runs mmcv's MaskedConv2d, which has no CPU kernel in mmcv 2.1.0 "
    "(masked_im2col_forward_impl: implementation for device cpu not found)"
)
CASES = [
    # backbone dcn= (config-swappable), RoI pooling (mmdet takes the class from mmcv.ops: redirect)
    *[
        Case(f"dcn/{c}", "DCN (ResNet/ResNeXt)", D)
        for c in [
            "cascade-mask-rcnn_r101-dconv-c3-c5_fpn_1x_coco.py",
            "cascade-mask-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py",
            "cascade-mask-rcnn_x101-32x4d-dconv-c3-c5_fpn_1x_coco.py",
            "cascade-rcnn_r101-dconv-c3-c5_fpn_1x_coco.py",
            "cascade-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py",
            "faster-rcnn_r101-dconv-c3-c5_fpn_1x_coco.py",
            "faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py",
            "faster-rcnn_x101-32x4d-dconv-c3-c5_fpn_1x_coco.py",
            "mask-rcnn_r101-dconv-c3-c5_fpn_1x_coco.py",
            "mask-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py",
            "mask-rcnn_r50-dconv-c3-c5_fpn_amp-1x_coco.py",
        ]
    ],
    Case("dcn/faster-rcnn_r50_fpn_dpool_1x_coco.py", "DCN (RoI pooling)", R),
    *[
        Case(f"dcnv2/{c}", "DCNv2 (ResNet)", D)
        for c in [
            "faster-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py",
            "faster-rcnn_r50-mdconv-group4-c3-c5_fpn_1x_coco.py",
            "mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py",
            "mask-rcnn_r50-mdconv-c3-c5_fpn_amp-1x_coco.py",
        ]
    ],
    Case("dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py", "DCNv2 (RoI pooling)", R),
    *[
        Case(f"empirical_attention/{c}", "Empirical attention", D)
        for c in ["faster-rcnn_r50-attn0010-dcn_fpn_1x_coco.py", "faster-rcnn_r50-attn1111-dcn_fpn_1x_coco.py"]
    ],
    *[
        Case(f"gcnet/{c}", "GCNet", D)
        for c in [
            "cascade-mask-rcnn_x101-32x4d-syncbn-dconv-c3-c5-r16-gcb-c3-c5_fpn_1x_coco.py",
            "cascade-mask-rcnn_x101-32x4d-syncbn-dconv-c3-c5-r4-gcb-c3-c5_fpn_1x_coco.py",
            "cascade-mask-rcnn_x101-32x4d-syncbn-dconv-c3-c5_fpn_1x_coco.py",
        ]
    ],
    *[
        Case(f"gfl/{c}", "GFL", D)
        for c in ["gfl_r101-dconv-c3-c5_fpn_ms-2x_coco.py", "gfl_x101-32x4d-dconv-c4-c5_fpn_ms-2x_coco.py"]
    ],
    Case("htc/htc_x101-64x4d-dconv-c3-c5_fpn_ms-400-1400-16xb1-20e_coco.py", "HTC", D),
    Case("regnet/mask-rcnn_regnetx-3.2GF-mdconv-c3-c5_fpn_1x_coco.py", "RegNet", D),
    Case(
        "ld/ld_r101-gflv1-r101-dcn_fpn_2x_coco.py",
        "LD (DCN teacher)",
        D,
        _ld_teacher,
        "teacher config path made absolute, no teacher checkpoint",
    ),
    *[
        Case(f"solov2/{c}", "SOLOv2", D)
        for c in [
            "solov2-light_r50-dcn_fpn_ms-3x_coco.py",
            "solov2_r101-dcn_fpn_ms-3x_coco.py",
            "solov2_x101-dcn_fpn_ms-3x_coco.py",
        ]
    ],
    # heads/necks that hard-code 'DCN'/'DCNv2' (reached by _scope_ or the redirect)
    Case("fcos/fcos_r50-dcn-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py", "FCOS", D),
    Case("centernet/centernet_r18-dcnv2_8xb16-crop512-140e_coco.py", "CenterNet", D),
    *[
        Case(f"nas_fcos/{c}", "NAS-FCOS", D)
        for c in [
            "nas-fcos_r50-caffe_fpn_fcoshead-gn-head_4xb4-1x_coco.py",
            "nas-fcos_r50-caffe_fpn_nashead-gn-head_4xb4-1x_coco.py",
        ]
    ],
    Case("ddod/ddod_r50_fpn_1x_coco.py", "DDOD", D),
    Case("yolox/yolox_tiny_8xb8-300e_coco.py", "YOLOX", D, _yolox_dcn, "dcn_on_last_conv=True"),
    # heads/necks/backbones that import mmcv's ops directly (only the redirect reaches them)
    *[
        Case(f"reppoints/{c}", "RepPoints", R)
        for c in [
            "reppoints-moment_r50_fpn-gn_head-gn_1x_coco.py",
            "reppoints-moment_r101-dconv-c3-c5_fpn-gn_head-gn_2x_coco.py",
            "reppoints-moment_x101-dconv-c3-c5_fpn-gn_head-gn_2x_coco.py",
        ]
    ],
    *[
        Case(f"vfnet/{c}", "VFNet", R)
        for c in [
            "vfnet_r50_fpn_1x_coco.py",
            "vfnet_r101-mdconv-c3-c5_fpn_ms-2x_coco.py",
            "vfnet_r50-mdconv-c3-c5_fpn_ms-2x_coco.py",
            "vfnet_res2net101-mdconv-c3-c5_fpn_ms-2x_coco.py",
            "vfnet_x101-32x4d-mdconv-c3-c5_fpn_ms-2x_coco.py",
            "vfnet_x101-64x4d-mdconv-c3-c5_fpn_ms-2x_coco.py",
        ]
    ],
    *[
        Case(f"guided_anchoring/{c}", "Guided Anchoring", R, no_predict=GA_NO_PREDICT)
        for c in ["ga-retinanet_r50-caffe_fpn_1x_coco.py", "ga-faster-rcnn_r50-caffe_fpn_1x_coco.py"]
    ],
    *[
        Case(f"foveabox/{c}", "FoveaBox", R)
        for c in [
            "fovea_r50_fpn_gn-head-align_4xb4-2x_coco.py",
            "fovea_r50_fpn_gn-head-align_ms-640-800-4xb4-2x_coco.py",
            "fovea_r101_fpn_gn-head-align_4xb4-2x_coco.py",
            "fovea_r101_fpn_gn-head-align_ms-640-800-4xb4-2x_coco.py",
        ]
    ],
    Case("cascade_rpn/cascade-rpn_faster-rcnn_r50-caffe_fpn_1x_coco.py", "Cascade RPN", R),
    Case(
        "centripetalnet/centripetalnet_hourglass104_16xb6-crop511-210e-mstest_coco.py",
        "CentripetalNet",
        R,
        _one_hourglass,
        "one hourglass stack instead of two",
    ),
    *[
        Case(f"dyhead/{c}", "DyHead", R)
        for c in ["atss_r50-caffe_fpn_dyhead_1x_coco.py", "atss_r50_fpn_dyhead_1x_coco.py"]
    ],
    *[
        Case(f"tood/{c}", "TOOD", R)
        for c in [
            "tood_r50_fpn_1x_coco.py",
            "tood_r101-dconv-c3-c5_fpn_ms-2x_coco.py",
            "tood_x101-64x4d-dconv-c4-c5_fpn_ms-2x_coco.py",
        ]
    ],
    *[
        Case(f"detectors/{c}", "DetectoRS", R)
        for c in [
            "cascade-rcnn_r50-sac_1x_coco.py",
            "detectors_cascade-rcnn_r50_1x_coco.py",
            "detectors_htc-r50_1x_coco.py",
            "detectors_htc-r101_20e_coco.py",
            "htc_r50-sac_1x_coco.py",
        ]
    ],
]
# Configs that cannot be built here for reasons that are not ours.
SKIPPED = {
    "glip/glip_atss_swin-t_a_fpn_dyhead_pretrain_obj365.py": "GLIP builds its language model from HuggingFace (BertModel 'bert-base-uncased'): needs the "
    "transformers package and a download",
}

DEPTH_SHRINK = {"ResNet", "ResNetV1d", "ResNeXt", "Res2Net", "DetectoRS_ResNet", "DetectoRS_ResNeXt"}


def _strip_pretrained(node):
    """No downloads: drop every pretrained init_cfg / pretrained= (we initialise from scratch)."""
    if isinstance(node, dict):
        for key in list(node):
            value = node[key]
            if key == "pretrained" and isinstance(value, str):
                node[key] = None
            elif key == "init_cfg" and "Pretrained" in json.dumps(value, default=str):
                node[key] = None
            else:
                _strip_pretrained(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _strip_pretrained(value)


def _shrink_depth(node):
    """ResNet-family backbones of depth 101 become 50: the same block types and DCN stages."""
    if isinstance(node, dict):
        if node.get("type") in DEPTH_SHRINK and node.get("depth") == 101:
            node["depth"] = 50
        for value in node.values():
            _shrink_depth(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _shrink_depth(value)


CAPS = {"nms_pre": 200, "max_per_img": 50, "max_num": 50, "num": 32}  # proposals, detections, sampled RoIs


def _few_proposals(node, parent_key=""):
    """Fewer proposals and sampled RoIs in train_cfg/test_cfg (the RoI heads' fc layers on thousands of
    RoIs, not the deformable layers, would take most of the time on a CPU), and SOLOv2's grids 4x coarser
    (its head runs 40x40 grids of 512 channels through deformable convs whatever the image size). No
    layer or parameter changes."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in CAPS and isinstance(value, int) and (key != "num" or parent_key == "sampler"):
                node[key] = min(value, CAPS[key])
            elif key == "num_grids" and isinstance(value, (list, tuple)):
                node[key] = [max(2, -(-g // 4)) for g in value]
            else:
                _few_proposals(value, key)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _few_proposals(value, parent_key)


def model_cfg(case: Case) -> ConfigDict:
    cfg = Config.fromfile(os.path.join(CONFIGS, case.config))
    model = cfg.model
    if case.tweak is not None:
        case.tweak(model)
    if isinstance(model.get("teacher_config"), str):  # LD: the teacher as a shrunk config of its own
        teacher = Config.fromfile(model.teacher_config)
        _strip_pretrained(teacher.model)
        _shrink_depth(teacher.model)
        _few_proposals(teacher.model)
        model.teacher_config = ConfigDict(model=teacher.model)
    _strip_pretrained(model)
    _shrink_depth(model)
    _few_proposals(model)
    return model


# --- what runs where ---------------------------------------------------------------------------------------

MMCV_EXT_FUNCTIONS = (
    "deform_conv_forward",
    "deform_conv_backward_input",
    "deform_conv_backward_parameters",
    "modulated_deform_conv_forward",
    "modulated_deform_conv_backward",
    "deform_roi_pool_forward",
    "deform_roi_pool_backward",
)
# (by module name: the attribute mmcv.ops.deform_roi_pool is the function, not the submodule)
MMCV_EXTS = tuple(
    importlib.import_module(f"mmcv.ops.{m}").ext_module
    for m in ("deform_conv", "modulated_deform_conv", "deform_roi_pool")
)


@contextlib.contextmanager
def mmcv_kernels_raise():
    """mmcv's deformable kernels (its compiled extension's entry points) raise while this is on."""
    saved = []

    def refuse(name):
        def kernel(*args, **kwargs):
            raise AssertionError(f"mmcv's kernel {name} ran")

        return kernel

    for ext in {id(e): e for e in MMCV_EXTS}.values():
        for name in MMCV_EXT_FUNCTIONS:
            if hasattr(ext, name):
                saved.append((ext, name, getattr(ext, name)))
                setattr(ext, name, refuse(name))
    try:
        yield
    finally:
        for ext, name, fn in saved:
            setattr(ext, name, fn)


class OpCounter(TorchDispatchMode):
    """Counts the mmdcnv2 ops that reach the dispatcher (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("mmdcnv2::"):
            self.counts[name.split("::", 1)[1]] += 1
        return func(*args, **(kwargs or {}))


def mmcv_deform_classes():
    from mmdcnv2.mmcv_ops import MMCV_ORIGINALS

    return tuple(v for v in MMCV_ORIGINALS.values() if isinstance(v, type))


def parts(model):
    """(prefix, module) of the model and of LD's teacher, which mmdet keeps out of the module tree
    (and out of the state dict)."""
    found = [("", model)]
    if getattr(model, "teacher_model", None) is not None:
        found.append(("teacher_model.", model.teacher_model))
    return found


def named_modules(model):
    return [(prefix + n, m) for prefix, part in parts(model) for n, m in part.named_modules()]


def deformable_layers(model) -> Dict[str, str]:
    """name -> class name of every deformable layer (mmcv's or ours)."""
    kinds = mmcv_deform_classes() + (our_ops.DeformConv2d, our_ops.ModulatedDeformConv2d, our_ops.DeformRoIPool)
    return {n: type(m).__name__ for n, m in named_modules(model) if isinstance(m, kinds)}


def functional_users(model) -> Dict[str, str]:
    """Layers that call mmcv's functional deform_conv2d (TOOD's head, DetectoRS' SAC with offsets)."""
    from mmcv.ops.saconv import SAConv2d
    from mmdet.models.dense_heads import TOODHead

    return {
        n: type(m).__name__
        for n, m in named_modules(model)
        if isinstance(m, TOODHead) or (isinstance(m, SAConv2d) and m.use_deform)
    }


def has_roi_pool(model) -> bool:
    return any("RoI" in c for c in deformable_layers(model).values())


def state_dicts(model):
    return {prefix: part.state_dict() for prefix, part in parts(model)}


# --- running a model ---------------------------------------------------------------------------------------

SIDE = 96  # small images; mmcv cannot run its DCN layers on a map smaller than their kernel (c5: 3x3)


def inputs(cfg, batch):
    num_classes = 80
    for head in ("bbox_head", "mask_head", "rpn_head"):
        if head in cfg and isinstance(cfg[head], dict) and "num_classes" in cfg[head]:
            num_classes = cfg[head]["num_classes"]
    with_mask = "mask_head" in cfg or "mask_head" in cfg.get("roi_head", {})
    with_semantic = "semantic_head" in cfg.get("roi_head", {})
    return demo_mm_inputs(
        batch,
        [(3, SIDE, SIDE)] * batch,
        num_items=[3, 2][:batch],
        num_classes=num_classes,
        with_mask=with_mask,
        with_semantic=with_semantic,
    )


def train_step(model, packed):
    # heads that read the training progress (TOOD switches assigners at an epoch) find it where the runner puts it
    MessageHub.get_current_instance().update_info("epoch", 0)
    MessageHub.get_current_instance().update_info("iter", 0)
    model.train()
    data = model.data_preprocessor(copy.deepcopy(packed), True)
    losses = model(**data, mode="loss")
    total, _ = model.parse_losses(losses)
    assert torch.isfinite(total), losses
    total.backward()


def predict(model, packed):
    """One image (Guided Anchoring's masked convolution takes one image at a time at test time)."""
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(copy.deepcopy(packed), False)
        return model(**data, mode="predict")


def features(model, packed):
    model.eval()
    with torch.no_grad():
        data = model.data_preprocessor(copy.deepcopy(packed), False)
        return [model.extract_feat(data["inputs"])] + [
            part.extract_feat(data["inputs"]) for prefix, part in parts(model) if prefix
        ]


def flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in flatten(o)]
    return []


def _detached(tree):
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, tree)


@contextlib.contextmanager
def record_calls(model, names):
    """(name, args, kwargs, output) of every call of the named modules."""
    modules = dict(named_modules(model))
    calls, handles = [], []
    for name in sorted(names):
        handles.append(
            modules[name].register_forward_hook(
                lambda m, args, kwargs, out, name=name: calls.append(
                    (name, _detached(args), _detached(kwargs), _detached(out))
                ),
                with_kwargs=True,
            )
        )
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def assert_close(got, want, rtol, atol_scale, what):
    got, want = flatten(got), flatten(want)
    assert len(got) == len(want), f"{what}: {len(got)} outputs, expected {len(want)}"
    for a, b in zip(want, got):
        if a.is_floating_point():
            scale = max(1.0, a.abs().max().item()) if a.numel() else 1.0
            torch.testing.assert_close(b, a, rtol=rtol, atol=atol_scale * scale, msg=lambda m: f"{what}: {m}")
        else:
            assert torch.equal(a, b), what


def offset_predictors(model, names):
    """``<name>.conv_offset`` of each named layer that predicts its own offsets with an ``nn.Conv2d``
    (the Pack layers: DCN, DCNv2 and mmdet's layers built from them)."""
    modules = dict(named_modules(model))
    return [n + ".conv_offset" for n in names if isinstance(modules.get(n + ".conv_offset"), torch.nn.Conv2d)]


def conv_rounding_bound(conv, x):
    """An elementwise bound on the float32 rounding error of ``conv(x)``, whatever the order of the sums
    (the kernel library picks it per machine): n * u * (|W| * |x| + |b|), n the length of each dot product,
    u the unit roundoff of the dtype (the classic bound for a recursive sum of products)."""
    with torch.no_grad():
        x = x.double().abs()
        n = conv.weight[0].numel()
        mag = torch.nn.functional.conv2d(
            x, conv.weight.double().abs(), None, conv.stride, conv.padding, conv.dilation, conv.groups
        )
        if conv.bias is not None:
            mag = mag + conv.bias.double().abs().view(1, -1, 1, 1)
        return (n + 1) * torch.finfo(conv.weight.dtype).eps / 2 * mag


class _Fixed(torch.nn.Module):
    """Stands in for a layer's ``conv_offset``: returns the given output, whatever its input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x):
        return self.out.contiguous()  # as an NCHW convolution gives it (mmcv's kernels expect NCHW offsets)


def replay_on(model, calls) -> Tuple[int, int]:
    """Runs each recorded call again on the same-named module of ``model`` (mmcv's ops) with the same
    inputs and compares the outputs. Calls mmcv cannot run on a CPU (a map smaller than the kernel) are
    counted, not compared. Returns (compared, impossible).

    A layer that predicts its own offsets (``conv_offset``, recorded just before the layer itself) is
    compared in two parts, each with a tolerance that follows its own condition: mmcv's ``conv_offset`` on
    the same input against ours, within the rounding bound of a float32 convolution (the two may sum in
    different orders: oneDNN on channels-last data against the NCHW kernel); then the layer with mmcv's
    ``conv_offset`` giving our offsets, so that both deformable ops see the same input, offsets and mask.
    Comparing the layer in one piece would ask the op for more than float32 can give: the sampled value's
    derivative in the offset scales with the features, so features of 1e4 turn offsets that differ by 1e-4 px
    (float32 rounding of an offset conv over such features) into outputs that differ by ~1e-1."""
    modules = dict(named_modules(model))
    compared = impossible = 0
    offsets = {}
    with torch.no_grad():
        for name, args, kwargs, out in calls:
            module = modules[name]
            if name.endswith(".conv_offset"):
                ref = module(*args, **kwargs)
                bound = conv_rounding_bound(module, args[0])
                excess = ((out.double() - ref.double()).abs() - 2 * bound).max().item()
                assert excess <= 0, f"{name}: differs from mmcv's by more than float32 rounding ({excess:.3g} over)"
                offsets[name[: -len(".conv_offset")]] = out
                continue
            fixed = offsets.pop(name, None)
            original = module.conv_offset if fixed is not None else None
            if fixed is not None:
                module.conv_offset = _Fixed(fixed)
            try:
                ref = module(*args, **kwargs)
            except RuntimeError as e:
                if "smaller than kernel" not in str(e):
                    raise
                impossible += 1
                continue
            finally:
                if original is not None:
                    module.conv_offset = original
            assert_close(out, ref, 1e-4, 1e-4, f"{name} (same inputs{', same offsets' if fixed is not None else ''})")
            compared += 1
    return compared, impossible


def init_deformable_parts(model):
    """mmdet's init_weights of the parts that hold deformable layers (heads zero their conv_offset, init
    their DeformConv2d, ...). Not of the whole model: mmengine records every parameter's mean after every
    initialiser, which takes seconds for a whole detector on a CPU."""
    from mmengine.model import BaseModule

    names = set(deformable_layers(model)) | set(functional_users(model))
    for prefix, part in parts(model):
        for name, child in part.named_children():
            if isinstance(child, BaseModule) and any(n.startswith(prefix + name + ".") for n in names):
                child.init_weights()


def perturb_offsets(model):
    """Zero-initialised parameters (offset and mask predictors) get small random values, so that the
    layers really deform (offsets of a fraction of a pixel to a few pixels); the same values go to both
    models through the state dict."""
    g = torch.Generator().manual_seed(0)

    def small(p):
        fan_in = p[0].numel() if p.dim() > 1 else 1
        p.copy_(torch.randn(p.shape, generator=g) * (0.3 / fan_in**0.5))

    with torch.no_grad():
        for _, part in parts(model):
            for m in part.modules():
                # the Pack layers' offset predictors (which Kaiming initialisation of a whole backbone without
                # its pretrained weights makes large: offsets of tens of pixels)
                if isinstance(getattr(m, "conv_offset", None), torch.nn.Conv2d):
                    for p in (m.conv_offset.weight, m.conv_offset.bias):
                        if p is not None:
                            small(p)
            for p in part.parameters():
                if p.numel() and not torch.any(p):
                    small(p)


class RegistryWarnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        msg = record.getMessage()
        if "registry" in msg.lower() or "scope" in msg.lower():
            self.messages.append(msg)


@contextlib.contextmanager
def registry_warnings():
    handler = RegistryWarnings()
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


@pytest.fixture(scope="module")
def switch():
    """mmdcnv2.mmcv_ops, switched off between uses (and after this module's tests). mmengine's INFO
    messages (init_weights reports every parameter) are held back meanwhile: printing them is slow."""
    from mmdcnv2 import mmcv_ops

    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)
    mmcv_ops.restore()
    yield mmcv_ops
    mmcv_ops.restore()
    logger.setLevel(level)


def build(cfg, switch, on: bool, scope: Optional[str] = None):
    (switch.redirect if on else switch.restore)()
    cfg = copy.deepcopy(cfg)
    if scope:
        cfg["_scope_"] = scope
    torch.manual_seed(0)
    return MODELS.build(cfg)


def check(case: Case, cfg, switch):
    t0 = time.perf_counter()
    # A: mmcv's ops. B: mmdcnv2.mmcv_ops on.
    model_a = build(cfg, switch, on=False)
    model_b = build(cfg, switch, on=True)
    init_deformable_parts(model_b)
    layers_a, layers_b = deformable_layers(model_a), deformable_layers(model_b)
    assert layers_a or functional_users(model_a), f"{case.config}: no deformable layer in the model"
    assert layers_a == layers_b, "not the same deformable layers"
    assert not any(isinstance(m, mmcv_deform_classes()) for _, m in named_modules(model_b)), "an mmcv layer is left"

    # state dicts: same keys and shapes, strict loading both ways; offsets made non-zero
    perturb_offsets(model_b)
    sds_a, sds_b = state_dicts(model_a), state_dicts(model_b)
    for (prefix, part_a), (_, part_b) in zip(parts(model_a), parts(model_b)):
        sd_a, sd_b = sds_a[prefix], sds_b[prefix]
        assert list(sd_a) == list(sd_b)
        assert all(sd_a[k].shape == sd_b[k].shape for k in sd_a)
        part_a.load_state_dict(sd_b, strict=True)
        part_b.load_state_dict(part_a.state_dict(), strict=True)

    # B predicts and trains on mmdcnv2's ops; mmcv's deformable kernels raise
    one, two = inputs(cfg, 1), inputs(cfg, 2)
    recorded = [n for n, c in layers_b.items() if "RoI" not in c] + list(functional_users(model_b))
    recorded += offset_predictors(model_b, recorded)
    with mmcv_kernels_raise(), OpCounter() as counter:
        with record_calls(model_b, recorded) as calls:
            if not case.no_predict:
                for _, part in parts(model_b):  # LD's teacher only runs in training (without gradients)
                    assert len(predict(part, one)) == 1
        feats_b = features(model_b, one)
        torch.manual_seed(0)
        with record_calls(model_b, recorded if case.no_predict else []) as train_calls:
            train_step(model_b, two)
        calls += train_calls
    if recorded:
        assert calls, "no deformable convolution ran"
        assert counter.counts["deform_conv2d"] > 0, counter.counts
        if any(not n.startswith("teacher_model.") for n in recorded):
            assert counter.counts["deform_conv2d_backward"] > 0, counter.counts
    if has_roi_pool(model_b):
        assert counter.counts["deform_roi_pool"] > 0 and counter.counts["deform_roi_pool_backward"] > 0, counter.counts

    # A, on mmcv's kernels where it has CPU ones: each deformable layer given the same inputs gives the
    # same outputs, and the features (backbone + neck) are the same end to end
    switch.restore()
    model_a.eval()  # (LD's train() returns None: no chaining)
    compared, impossible = replay_on(model_a, calls)
    assert compared > 0 or not recorded
    end_to_end = False
    try:
        feats_a = features(model_a, one)
    except RuntimeError as e:  # mmcv cannot run some layer on a CPU (map smaller than its kernel)
        assert "smaller than kernel" in str(e), e
    else:
        # float32 rounding differences grow through ~16 deformed blocks of random weights: to 0.3% of the
        # largest value end to end (each layer on the same inputs: to 0.01%, above)
        assert_close(feats_b, feats_a, 1e-3, 3e-3, "features")
        end_to_end = True

    # _scope_='mmdcnv2' without the switch: no registry warning; mmcv layers left exactly where needed
    with registry_warnings() as warnings_seen:
        model_s = build(cfg, switch, on=False, scope="mmdcnv2")
    assert not warnings_seen, warnings_seen
    left = any(isinstance(m, mmcv_deform_classes()) for _, m in named_modules(model_s)) or bool(
        functional_users(model_s)
    )
    assert left == case.needs_redirect, f"needs the redirect: {left}, the table says {case.needs_redirect}"
    assert {p: list(sd) for p, sd in state_dicts(model_s).items()} == {p: list(sd) for p, sd in sds_a.items()}
    return dict(
        seconds=time.perf_counter() - t0,
        compared=compared,
        impossible=impossible,
        end_to_end=end_to_end,
        layers=len(layers_b),
        ops=dict(counter.counts),
    )


_done: Dict[str, object] = {}


def _key(cfg) -> str:
    return json.dumps(cfg.to_dict(), sort_keys=True, default=str)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.config)
def test_mmdet_config_on_mmdcnv2(case, switch):
    cfg = model_cfg(case)
    key = _key(cfg)
    if key not in _done:  # configs that share a model (schedules, datasets, depths shrunk to 50) run once
        try:
            _done[key] = check(case, cfg, switch)
        except BaseException as e:
            _done[key] = e
            raise
        finally:
            switch.restore()
    if isinstance(_done[key], BaseException):
        raise AssertionError(f"the same model failed for another config: {_done[key]!r}")


MARKER = re.compile(r"dcn|deform|sac|DCN")
DEFORM_TYPES = {"DCN", "DCNv2", "DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPoolPack"}


def _turns_deformable_on(node) -> bool:
    """Whether a resolved model config turns a deformable op on by name (the rule that gives the list)."""
    if isinstance(node, dict):
        kind = node.get("type")
        if kind in DEFORM_TYPES or (kind == "SAC" and node.get("use_deform")):
            return True
        for key, value in node.items():
            if key in ("dcn", "dcn_cfg", "dcn_on_last_conv", "num_dcn", "use_dcn", "with_deform") and value:
                return True
            if key == "teacher_config" and isinstance(value, str) and "dconv" in value:
                return True
            if _turns_deformable_on(value):
                return True
    elif isinstance(node, (list, tuple)):
        return any(_turns_deformable_on(v) for v in node)
    return False


def test_the_list_holds_every_config_that_turns_deformable_ops_on():
    """Every config file of the installed mmdet whose model turns DCN, deformable SAC, FoveaBox's deformable
    alignment or deformable RoI pooling on is in CASES (or SKIPPED). Configs are parsed only when they or
    a config they inherit from mention such a layer."""
    files = sorted(glob.glob(os.path.join(CONFIGS, "**", "*.py"), recursive=True))
    text = {f: open(f).read() for f in files}
    bases = {
        f: [
            os.path.normpath(os.path.join(os.path.dirname(f), b))
            for b in re.findall(r"['\"]([^'\"]+\.py)['\"]", text[f])
        ]
        for f in files
    }

    def mentions(f, seen=()):
        return bool(MARKER.search(text[f])) or any(
            b in text and b not in seen and mentions(b, seen + (f,)) for b in bases[f]
        )

    listed = {c.config for c in CASES} | set(SKIPPED)
    found = set()
    for f in files:
        rel = os.path.relpath(f, CONFIGS)
        if "_base_" in rel.split(os.sep) or rel.startswith("legacy") or not mentions(f):
            continue
        try:
            cfg = Config.fromfile(f, import_custom_modules=False)
        except Exception:  # configs of other OpenMMLab packages (mmpretrain), or with missing bases
            continue
        if "model" in cfg and _turns_deformable_on(cfg.model.to_dict()):
            found.add(rel)
    assert len(found) >= 43  # the count of configs that turn DCN on (+ SAC, FoveaBox)
    assert found <= listed, sorted(found - listed)


@pytest.mark.parametrize("config", sorted(SKIPPED))
def test_mmdet_config_not_buildable_here(config):
    assert os.path.isfile(os.path.join(CONFIGS, config))
    pytest.skip(SKIPPED[config])
