"""Runs mmcv's deformable ops on mmdcnv2's kernels, for the model code that imports them from mmcv.

Importing this module redirects, for the whole process::

    custom_imports = dict(imports=["mmdcnv2", "mmdcnv2.mmcv_ops"], allow_failed_imports=False)

- the classes ``DeformConv2d``, ``DeformConv2dPack``, ``ModulatedDeformConv2d``,
  ``ModulatedDeformConv2dPack``, ``DeformRoIPool``, ``DeformRoIPoolPack``,
  ``ModulatedDeformRoIPoolPack`` and the functions ``deform_conv2d``, ``modulated_deform_conv2d``,
  ``deform_roi_pool`` (with mmcv's own signatures) wherever they are bound: in ``mmcv.ops``, in its
  submodules (``mmcv.ops.deform_conv``, ``mmcv.ops.saconv``, ...) and in every module already imported
  that took them from there (mmdet's RepPoints, VFNet, Guided Anchoring, FoveaBox, Cascade RPN,
  CentripetalNet, TOOD, DyHead and GLIP heads, DetectoRS' ``SAConv2d``, yours); modules imported later
  get ours from ``mmcv.ops``;
- the registry names under which mmcv registers them (``DCN``, ``DCNv2``), so that mmdet's heads that
  hard-code ``conv_cfg=dict(type='DCNv2')`` build ours without ``_scope_``.

Layers built before the switch keep their class, but their ``forward`` calls the module-level
function of their mmcv module, which is now ours. State dicts are unchanged (the classes have mmcv's
parameter names, shapes and initialisation); checkpoints load both ways. It logs once what it replaced.

``restore()`` undoes all of it (layers built meanwhile stay ours); ``redirect()`` does it again.
Nothing changes unless this module is imported: ``import mmdcnv2`` alone leaves mmcv alone.
"""

import importlib
import sys
import threading
import types
from typing import Dict, List, Optional, Tuple, Union

import mmcv.ops  # noqa: F401  (imported first, so that every module of it can be redirected)
import torch.nn.functional as F
from mmengine.logging import print_log
from mmengine.registry import MODELS as _ROOT_MODELS
from torch import Tensor
from torch.nn.modules.utils import _pair

from mmdcnv2 import ops as _ops
from mmdcnv2.ops.deform_conv import _conv_out

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    "deform_conv2d",
    "modulated_deform_conv2d",
    "deform_roi_pool",
    "redirect",
    "restore",
    "is_redirected",
]

IntPair = Union[int, Tuple[int, int]]


# --- mmcv's functional signatures on our ops -----------------------------------------------------------


def _check_groups(fn: str, input: Tensor, offset: Tensor, weight: Tensor, groups: int, deform_groups: int) -> None:
    """mmcv passes groups and deform_groups; our op infers them from the shapes: they must agree."""
    if not isinstance(weight, Tensor) or not isinstance(offset, Tensor) or not isinstance(input, Tensor):
        return  # the op names the argument that is not a tensor
    if weight.dim() != 4 or offset.dim() != 4 or input.dim() != 4:
        return  # the op names the argument with the wrong rank
    if groups < 1 or weight.shape[1] * groups != input.shape[1]:
        raise ValueError(
            f"{fn}: groups={groups} does not fit input channels {input.shape[1]} and weight "
            f"{tuple(weight.shape)} (weight.shape[1] must be in_channels / groups)"
        )
    taps = weight.shape[2] * weight.shape[3]
    if deform_groups < 1 or offset.shape[1] != 2 * deform_groups * taps:
        raise ValueError(
            f"{fn}: deform_groups={deform_groups} does not fit offset {tuple(offset.shape)} "
            f"(offset must have 2 * deform_groups * kH * kW = {2 * max(deform_groups, 0) * taps} "
            "channels)"
        )


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
    bias: bool = False,
    im2col_step: int = 32,
) -> Tensor:
    """``mmcv.ops.deform_conv2d`` (DCNv1) on mmdcnv2's op, with mmcv's positional signature.

    Args:
        input (Tensor[N, C_in, H, W]), offset (Tensor[N, 2 * deform_groups * kH * kW, H_out, W_out]),
        weight (Tensor[C_out, C_in / groups, kH, kW]); stride, padding, dilation, groups, deform_groups
        as in mmcv (groups and deform_groups must agree with the shapes). ``bias`` must be False (as in
        mmcv); ``im2col_step`` is accepted and ignored (our blocking is automatic).

    Like mmcv, the input and weight are cast to the offset's dtype (mmcv's AMP convention).
    """
    if bias is not False:
        raise ValueError(f"deform_conv2d: bias must be False (mmcv's signature), got {bias!r}")
    input = input.type_as(offset)
    weight = weight.type_as(input)
    _check_groups("deform_conv2d", input, offset, weight, groups, deform_groups)
    return _ops.deform_conv2d(input, offset, weight, None, stride, padding, dilation)


def _read_as_mmcv(fn: str, name: str, t: Tensor, out_hw: Tuple[int, int]) -> Tensor:
    """mmcv's modulated kernel does not check the offset's and mask's height and width: for each image it
    reads the first C * H_out * W_out values of that image's (contiguous) block as a C x H_out x W_out map.
    mmdet's DyHead relies on it (its upper-level conv gets the offsets of the middle level, twice the
    output's size); we read the same values. A tensor with fewer values than that is refused."""
    if t.dim() != 4 or tuple(t.shape[2:]) == tuple(out_hw):
        return t
    need = t.shape[1] * out_hw[0] * out_hw[1]
    if t[0].numel() < need:
        raise ValueError(
            f"{fn}: {name} of shape {tuple(t.shape)} is smaller than the output's {out_hw[0]} x {out_hw[1]} map"
        )
    return t.reshape(t.shape[0], -1)[:, :need].reshape(t.shape[0], t.shape[1], *out_hw)


def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> Tensor:
    """``mmcv.ops.modulated_deform_conv2d`` (DCNv2) on mmdcnv2's op, with mmcv's signature.

    mask: Tensor[N, deform_groups * kH * kW, H_out, W_out]; bias: Tensor[C_out] or None; the rest as in
    :func:`deform_conv2d`. Input, weight, bias and mask are cast to the offset's dtype, as mmcv does.
    An offset or mask larger than the output map is read as mmcv reads it (see ``_read_as_mmcv``).
    """
    input = input.type_as(offset)
    weight = weight.type_as(input)
    mask = mask.type_as(input)
    if bias is not None:
        bias = bias.type_as(input)
    _check_groups("modulated_deform_conv2d", input, offset, weight, groups, deform_groups)
    if input.dim() == 4 and weight.dim() == 4:
        s, p, d = _pair(stride), _pair(padding), _pair(dilation)
        out_hw = tuple(_conv_out(input.shape[2 + i], weight.shape[2 + i], s[i], p[i], d[i]) for i in range(2))
        if min(out_hw) > 0:
            offset = _read_as_mmcv("modulated_deform_conv2d", "offset", offset, out_hw)
            mask = _read_as_mmcv("modulated_deform_conv2d", "mask", mask, out_hw)
    return _ops.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor],
    output_size: IntPair,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """``mmcv.ops.deform_roi_pool`` on mmdcnv2's op (which also runs on the CPU), mmcv's signature.

    input Tensor[N, C, H, W], rois Tensor[K, 5], offset Tensor[K, 2, PH, PW] or None; returns
    Tensor[K, C, PH, PW] in the input's dtype.
    """
    return _ops.deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma).to(input.dtype)


# --- mmcv's classes on our ops ---------------------------------------------------------------------------
# Thin subclasses of ours: same arguments, parameters, state-dict keys and initialisation as mmcv's
# (ours already have them); they exist so that what the redirect put in place is recognisable (and
# removable by restore()) and to carry mmcv's small behaviours that our own classes do not copy.


class DeformConv2d(_ops.DeformConv2d):
    """mmcv's ``DeformConv2d`` on mmdcnv2's op. As in mmcv, an input smaller than the kernel is
    zero-padded at the bottom and right (offset likewise) and the output cropped back."""

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        pad_h = max(self.kernel_size[0] - x.size(2), 0)
        pad_w = max(self.kernel_size[1] - x.size(3), 0)
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
            offset = F.pad(offset, (0, pad_w, 0, pad_h))
        out = deform_conv2d(
            x, offset, self.weight, self.stride, self.padding, self.dilation, self.groups, self.deform_groups
        )
        if pad_h or pad_w:
            out = out[:, :, : out.size(2) - pad_h, : out.size(3) - pad_w].contiguous()
        return out


class DeformConv2dPack(_ops.DeformConv2dPack, DeformConv2d):
    """mmcv's ``DeformConv2dPack`` (registered in mmcv as ``DCN``) on mmdcnv2's op."""


class ModulatedDeformConv2d(_ops.ModulatedDeformConv2d):
    """mmcv's ``ModulatedDeformConv2d`` on mmdcnv2's op."""

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return modulated_deform_conv2d(
            x,
            offset,
            mask,
            self.weight,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.deform_groups,
        )


class ModulatedDeformConv2dPack(_ops.ModulatedDeformConv2dPack, ModulatedDeformConv2d):
    """mmcv's ``ModulatedDeformConv2dPack`` (registered in mmcv as ``DCNv2``) on mmdcnv2's op."""


class DeformRoIPool(_ops.DeformRoIPool):
    """mmcv's ``DeformRoIPool`` on mmdcnv2's op (CPU and CUDA)."""


class DeformRoIPoolPack(_ops.DeformRoIPoolPack, DeformRoIPool):
    """mmcv's ``DeformRoIPoolPack`` on mmdcnv2's op (CPU and CUDA)."""


class ModulatedDeformRoIPoolPack(_ops.ModulatedDeformRoIPoolPack, DeformRoIPool):
    """mmcv's ``ModulatedDeformRoIPoolPack`` on mmdcnv2's op (CPU and CUDA)."""


# --- the switch ------------------------------------------------------------------------------------------

_NAMES = (
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPoolPack",
    "deform_conv2d",
    "modulated_deform_conv2d",
    "deform_roi_pool",
)
# (importlib: the attribute mmcv.ops.deform_roi_pool is the function, which hides the submodule)
_mmcv_deform_conv = importlib.import_module("mmcv.ops.deform_conv")
_mmcv_modulated_deform_conv = importlib.import_module("mmcv.ops.modulated_deform_conv")
_mmcv_deform_roi_pool = importlib.import_module("mmcv.ops.deform_roi_pool")
_HOMES = {
    "DeformConv2d": _mmcv_deform_conv,
    "DeformConv2dPack": _mmcv_deform_conv,
    "deform_conv2d": _mmcv_deform_conv,
    "ModulatedDeformConv2d": _mmcv_modulated_deform_conv,
    "ModulatedDeformConv2dPack": _mmcv_modulated_deform_conv,
    "modulated_deform_conv2d": _mmcv_modulated_deform_conv,
    "DeformRoIPool": _mmcv_deform_roi_pool,
    "DeformRoIPoolPack": _mmcv_deform_roi_pool,
    "ModulatedDeformRoIPoolPack": _mmcv_deform_roi_pool,
    "deform_roi_pool": _mmcv_deform_roi_pool,
}
#: mmcv's own objects, taken from the modules that define them (before any redirect).
MMCV_ORIGINALS: Dict[str, object] = {name: vars(_HOMES[name])[name] for name in _NAMES}
#: what replaces each of them
REPLACEMENTS: Dict[str, object] = {name: globals()[name] for name in _NAMES}

_lock = threading.Lock()
_bindings: List[Tuple[object, str, object]] = []  # (module, attribute, mmcv's object) replaced
_registered: List[Tuple[object, str, object]] = []  # (registry, name, mmcv's class) replaced
_active = False


def is_redirected() -> bool:
    """Whether mmcv's deformable ops currently point to mmdcnv2's."""
    return _active


def _namespaces():
    """(name, module, its __dict__) of every imported module that is not part of mmdcnv2."""
    for module_name, module in list(sys.modules.items()):
        if not isinstance(module, types.ModuleType) or module_name == "mmdcnv2" or module_name.startswith("mmdcnv2."):
            continue
        yield module_name, module, module.__dict__


def _registries(root) -> List[object]:
    found, todo = [], [root]
    while todo:
        registry = todo.pop()
        registry = getattr(registry, "_registry", registry)  # mmdcnv2's registries are held through a view
        if registry.scope == "mmdcnv2":
            continue
        found.append(registry)
        todo.extend(registry._children.values())
    return found


def redirect() -> Dict[str, List[str]]:
    """Points mmcv's deformable ops to mmdcnv2's (see the module's docstring); idempotent.

    Returns what it replaced: ``{"modules": ["mmcv.ops.DeformConv2d", ...], "registry": ["DCN", ...]}``
    (empty lists when the redirect was already in place).
    """
    global _active
    with _lock:
        if _active:
            return {"modules": [], "registry": []}
        by_id = {id(obj): name for name, obj in MMCV_ORIGINALS.items()}
        for _, module, namespace in _namespaces():
            for attr, value in list(namespace.items()):
                name = by_id.get(id(value))
                if name is not None and value is MMCV_ORIGINALS[name]:
                    namespace[attr] = REPLACEMENTS[name]
                    _bindings.append((module, attr, value))
        for registry in _registries(_ROOT_MODELS):
            for key, value in list(registry._module_dict.items()):
                name = by_id.get(id(value))
                if name is not None and value is MMCV_ORIGINALS[name]:
                    registry._module_dict[key] = REPLACEMENTS[name]
                    _registered.append((registry, key, value))
        _active = True
        replaced = {
            "modules": sorted(f"{m.__name__}.{a}" for m, a, _ in _bindings),
            "registry": sorted(f"{r.scope}::{r.name}.{k}" for r, k, _ in _registered),
        }
        mods = sorted({m.__name__ for m, _, _ in _bindings})
        print_log(
            f"mmdcnv2.mmcv_ops: mmcv's deformable ops now run on mmdcnv2's kernels: replaced "
            f"{len(_bindings)} bindings in {len(mods)} modules ({', '.join(mods)}) and the registry names "
            f"{', '.join(replaced['registry'])}. mmdcnv2.mmcv_ops.restore() undoes it.",
            logger="current",
        )
        return replaced


def restore() -> None:
    """Undoes :func:`redirect`: mmcv's objects are put back wherever the redirect replaced them, and in
    modules imported meanwhile that took ours from mmcv. Layers already built stay what they are."""
    global _active
    with _lock:
        if not _active:
            return
        ours = {id(obj): name for name, obj in REPLACEMENTS.items()}
        for module, attr, original in _bindings:
            module.__dict__[attr] = original
        for _, _, namespace in _namespaces():
            for attr, value in list(namespace.items()):
                name = ours.get(id(value))
                if name is not None and value is REPLACEMENTS[name]:
                    namespace[attr] = MMCV_ORIGINALS[name]
        for registry, key, original in _registered:
            registry._module_dict[key] = original
        _bindings.clear()
        _registered.clear()
        _active = False
        print_log("mmdcnv2.mmcv_ops: restored mmcv's own deformable ops.", logger="current")


redirect()
