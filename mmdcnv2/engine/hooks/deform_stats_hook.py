"""DeformStatsHook: whether the offsets of the deformable convolutions learn or run away."""

import logging
import math
import numbers
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
from mmengine.dist import get_rank, get_world_size
from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from torch import Tensor, nn

from mmdcnv2.ops import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2d, ModulatedDeformConv2dPack
from mmdcnv2.registry import HOOKS

# one call of a layer: what the hooks record (float64, on the layer's device)
_ABS_SUM, _N_OFF, _OUTSIDE, _N_PTS, _M_N, _M_MEAN, _M_M2, _BAD_OFF, _BAD_MASK = range(9)
_FIELDS = 9


def stage_of(name: str) -> str:
    """The stage key of a layer's module name: the name up to its first numeric part (a block
    index), ``backbone.layer3.0.conv2`` -> ``backbone.layer3``; without one, the parent's name
    (``neck.dcn`` -> ``neck``), and a top-level layer is a stage of its own (``dcn`` -> ``dcn``)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: max(i, 1)])
    return ".".join(parts[:-1]) or name


@torch.no_grad()
def sampling_stats(
    offset: Tensor,
    mask: Optional[Tensor],
    in_size: Tuple[int, int],
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
) -> Tensor:
    """The statistics of one call of a deformable conv, as a float64 Tensor[9] on the offset's device
    (no host synchronisation): sum of |offset| over all dy and dx values, their number, the number of
    sampling points outside the ``in_size`` (H, W) input map and of all sampling points, the mask's
    count, mean and sum of squared deviations, and the number of non-finite offset and mask values.

    The sampling point of tap (ki, kj) of deform group g at output (ho, wo) is
    (ho * stride - padding + ki * dilation + dy, wo * stride - padding + kj * dilation + dx); it is
    outside unless -1 < y < H and -1 < x < W (the op's rule: a non-finite position is outside).
    """
    off = offset.detach().float()
    N, C, Ho, Wo = off.shape
    kh, kw = kernel_size
    K = kh * kw
    H, W = in_size
    out = torch.zeros(_FIELDS, dtype=torch.float64, device=off.device)
    if off.numel() == 0:
        return out
    off = off.reshape(N, C // (2 * K), K, 2, Ho, Wo)
    arange = lambda n: torch.arange(n, dtype=torch.float32, device=off.device)  # noqa: E731
    tap_y = (arange(kh) * dilation[0]).repeat_interleave(kw).view(K, 1, 1)
    tap_x = (arange(kw) * dilation[1]).repeat(kh).view(K, 1, 1)
    base_y = tap_y + (arange(Ho) * stride[0] - padding[0]).view(1, Ho, 1)  # [K, Ho, 1]
    base_x = tap_x + (arange(Wo) * stride[1] - padding[1]).view(1, 1, Wo)  # [K, 1, Wo]
    y = off[:, :, :, 0] + base_y
    x = off[:, :, :, 1] + base_x
    inside = (y > -1) & (y < H) & (x > -1) & (x < W)
    out[_ABS_SUM] = off.abs().sum(dtype=torch.float64)
    out[_N_OFF] = off.numel()
    out[_OUTSIDE] = inside.numel() - inside.sum()
    out[_N_PTS] = inside.numel()
    out[_BAD_OFF] = (~torch.isfinite(off)).sum()
    if mask is not None and mask.numel():
        m = mask.detach().double()
        mean = m.mean()
        out[_M_N] = m.numel()
        out[_M_MEAN] = mean
        out[_M_M2] = ((m - mean) ** 2).sum()
        out[_BAD_MASK] = (~torch.isfinite(m)).sum()
    return out


def _merge(a: List[float], b: List[float]) -> List[float]:
    """Two records (lists of the 9 fields) -> one; the mask moments by Chan's parallel formula."""
    merged = [a[i] + b[i] for i in range(_FIELDS)]
    n = a[_M_N] + b[_M_N]
    if n > 0:
        delta = b[_M_MEAN] - a[_M_MEAN]
        merged[_M_MEAN] = a[_M_MEAN] + delta * b[_M_N] / n if a[_M_N] else b[_M_MEAN]
        merged[_M_M2] = a[_M_M2] + b[_M_M2] + (delta * delta * a[_M_N] * b[_M_N] / n if a[_M_N] and b[_M_N] else 0.0)
    return merged


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


@HOOKS.register_module()
class DeformStatsHook(Hook):
    """Logs, every ``interval`` training iterations, how the deformable convolutions of the model
    sample - whether their offsets learn or run away - and warns when they run away or turn
    non-finite.

    Covers every ``mmdcnv2.ops.DeformConv2d`` and ``ModulatedDeformConv2d`` of the model
    (``mmdcnv2.DCN``/``DCNv2``, the Pack layers, mmcv's classes on our op from
    ``mmdcnv2.mmcv_ops``): of a Pack layer it reads the output of its ``conv_offset``
    (``ModulatedDeformConv2dPack.split_offset_mask``'s layout, or DCNv1's: the output is the
    offset), of any other layer the ``offset`` and ``mask`` its caller passes. It records only
    on the iterations it logs (the module hooks are attached in ``before_train_iter`` of those
    iterations and removed in ``after_train_iter``; other iterations cost nothing), under
    ``torch.no_grad()`` on detached tensors, with one host synchronisation per device and
    logged iteration. A layer called more than once in an iteration (e.g. the crops of
    ``mmdcnv2.MimicRCNN``) contributes all its calls. No collectives: in a distributed run each
    rank logs its own statistics.

    Logged to ``runner.message_hub`` as ``train/deform/<key>/<stat>``, hence in the log line and
    every visualiser backend (``vis_data/scalars.json``) as ``deform/<key>/<stat>``, where
    ``<key>`` is the stage (layers grouped by ``stage_of``: ``backbone.layer3.0.conv2`` ->
    ``backbone.layer3``) or, with ``group_by='layer'``, the layer's module name:

    * ``offset_abs_mean``: mean of |dy| and |dx| over all offset values (taps, deform groups,
      positions, images) of the group's layers, in pixels of each layer's input map;
    * ``outside_ratio``: share of the sampling points outside the layer's input map (the
      point of tap (ki, kj) at output (ho, wo) is ho * stride - padding + ki * dilation + dy,
      likewise for x; outside unless -1 < y < H and -1 < x < W, the op's rule: such a point
      reads zero). With zero offsets the padding alone puts some border taps outside (a 3x3
      conv, padding 1 on a 6x6 map: 21%);
    * ``mask_mean``, ``mask_std`` (modulated layers only): mean and population standard
      deviation of the modulation (after the sigmoid of a Pack layer).

    Warnings (``print_log`` at ``logging.WARNING`` to the runner's logger, so in the log file),
    at most once per layer and kind, naming the layer, its class and the iteration:

    * non-finite: any NaN or inf in the layer's offset or mask;
    * ran away: the layer's mean |offset| above ``max_offset`` pixels;
    * optionally, the layer's outside share above ``max_outside_ratio``.

    Args:
        interval (int): log every ``interval`` training iterations, on the same iterations as
            a ``LoggerHook`` with that interval (set them equal). Default 50.
        max_offset (float, optional): the mean |offset| (pixels) above which a layer's offsets
            count as run away; ``None``: no such warning. Default 32: offsets are in pixels of
            the layer's input map, where a 3x3 layer's regular grid spans 3 pixels and learned
            offsets typically stay within a few pixels; 32 pixels is the whole width of the c5
            (stride 32) map of a 1024-pixel image, so a mean that large is no local deformation
            but offsets that diverged. Lower it for small maps (``outside_ratio`` tells how many
            samples already miss the map).
        max_outside_ratio (float, optional): warn when a layer's share of sampling points
            outside its map exceeds this, in [0, 1]; ``None`` (default): no such warning.
        group_by (str or callable): ``'stage'`` (default, ``stage_of``), ``'layer'`` (one key per
            layer) or a function from the layer's module name to its key.
    """

    priority = "NORMAL"  # after_train_iter before LoggerHook's (BELOW_NORMAL): this iteration's values

    def __init__(
        self,
        interval: int = 50,
        max_offset: Optional[float] = 32.0,
        max_outside_ratio: Optional[float] = None,
        group_by: Union[str, Callable[[str], str]] = "stage",
    ):
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        for name, value, top in (("max_offset", max_offset, math.inf), ("max_outside_ratio", max_outside_ratio, 1.0)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= top:
                what = "a number >= 0" if top == math.inf else f"a number in [0, {top:g}]"
                raise ValueError(f"{name} must be None or {what}, got {value!r}")
        if group_by == "stage":
            key_of = stage_of
        elif group_by == "layer":
            key_of = str
        elif callable(group_by):
            key_of = group_by
        else:
            raise ValueError(f"group_by must be 'stage', 'layer' or a callable, got {group_by!r}")
        self.interval = interval
        self.max_offset = None if max_offset is None else float(max_offset)
        self.max_outside_ratio = None if max_outside_ratio is None else float(max_outside_ratio)
        self.group_by = group_by
        self._key_of = key_of
        self._handles = []
        self._records: Dict[str, List[Tensor]] = OrderedDict()
        self._warned = set()  # (layer name, kind)

    # --- which layers, and the module hooks of a logged iteration -----------------------------------

    @staticmethod
    def deformable_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
        """(module name, module) of every deformable conv of ``model`` (a model wrapper's inner model)."""
        if is_model_wrapper(model):
            model = model.module
        return [(n, m) for n, m in model.named_modules() if isinstance(m, (DeformConv2d, ModulatedDeformConv2d))]

    def before_train(self, runner) -> None:
        self._remove()
        if not self.deformable_layers(runner.model):
            print_log(
                "DeformStatsHook: the model has no deformable conv layers (mmdcnv2.ops.DeformConv2d, "
                "ModulatedDeformConv2d); nothing to log",
                logger=self._logger(runner),
                level=logging.INFO,
            )

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._remove()
        if self.every_n_inner_iters(batch_idx, self.interval):
            self._attach(runner.model)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self._handles:
            return
        self._remove(keep_records=True)
        records, self._records = self._records, OrderedDict()
        self._report(runner, self._gather(records))

    def after_train(self, runner) -> None:
        self._remove()

    def _attach(self, model: nn.Module) -> None:
        for name, layer in self.deformable_layers(model):
            if isinstance(layer, (DeformConv2dPack, ModulatedDeformConv2dPack)):
                self._handles.append(layer.conv_offset.register_forward_hook(self._pack_hook(name, layer)))
            else:
                self._handles.append(layer.register_forward_pre_hook(self._caller_hook(name, layer), with_kwargs=True))

    def _remove(self, keep_records: bool = False) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if not keep_records:
            self._records = OrderedDict()

    def _record(self, name: str, layer: nn.Module, x, offset, mask) -> None:
        if not isinstance(x, Tensor) or not isinstance(offset, Tensor) or x.dim() != 4 or offset.dim() != 4:
            return
        stats = sampling_stats(
            offset,
            mask if isinstance(mask, Tensor) else None,
            tuple(x.shape[-2:]),
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
        )
        self._records.setdefault(name, []).append(stats)

    def _pack_hook(self, name: str, layer: nn.Module):
        modulated = isinstance(layer, ModulatedDeformConv2dPack)

        def hook(conv_offset, inputs, raw):
            with torch.no_grad():
                raw = raw.detach()
                offset, mask = layer.split_offset_mask(raw) if modulated else (raw, None)
                self._record(name, layer, inputs[0] if inputs else None, offset, mask)

        return hook

    def _caller_hook(self, name: str, layer: nn.Module):
        modulated = isinstance(layer, ModulatedDeformConv2d)

        def hook(module, args, kwargs):
            def arg(i, key):
                return args[i] if len(args) > i else kwargs.get(key)

            self._record(name, layer, arg(0, "x"), arg(1, "offset"), arg(2, "mask") if modulated else None)

        return hook

    # --- statistics, scalars, warnings --------------------------------------------------------------

    @staticmethod
    def _gather(records: Dict[str, List[Tensor]]) -> "OrderedDict[str, List[float]]":
        """Per layer, its calls merged: one device-to-host copy per device."""
        by_device = OrderedDict()
        for name, calls in records.items():
            for t in calls:
                by_device.setdefault(t.device, []).append((name, t))
        merged = OrderedDict((name, None) for name in records)
        for items in by_device.values():
            values = torch.stack([t for _, t in items]).cpu().tolist()
            for (name, _), v in zip(items, values):
                merged[name] = v if merged[name] is None else _merge(merged[name], v)
        return merged

    def _report(self, runner, layers: "OrderedDict[str, List[float]]") -> None:
        kinds = {name: type(m).__name__ for name, m in self.deformable_layers(runner.model)}
        groups = OrderedDict()
        for name, rec in layers.items():
            self._check(runner, name, kinds.get(name, "?"), rec)
            key = self._key_of(name)
            groups[key] = rec if key not in groups else _merge(groups[key], rec)
        hub = runner.message_hub
        for key, rec in groups.items():
            hub.update_scalar(f"train/deform/{key}/offset_abs_mean", _ratio(rec[_ABS_SUM], rec[_N_OFF]))
            hub.update_scalar(f"train/deform/{key}/outside_ratio", _ratio(rec[_OUTSIDE], rec[_N_PTS]))
            if rec[_M_N] > 0:
                hub.update_scalar(f"train/deform/{key}/mask_mean", rec[_M_MEAN])
                hub.update_scalar(
                    f"train/deform/{key}/mask_std",
                    math.sqrt(max(rec[_M_M2], 0.0) / rec[_M_N]) if math.isfinite(rec[_M_M2]) else float("nan"),
                )

    def _check(self, runner, name: str, kind: str, rec: List[float]) -> None:
        mean_abs = _ratio(rec[_ABS_SUM], rec[_N_OFF])
        outside = _ratio(rec[_OUTSIDE], rec[_N_PTS])
        where = f"the {kind} layer {name}"
        if get_world_size() > 1:
            where += f" (rank {get_rank()})"
        it = getattr(runner, "iter", -1) + 1
        if rec[_BAD_OFF] or rec[_BAD_MASK]:
            what = f"{int(rec[_BAD_OFF])} of {int(rec[_N_OFF])} offset values"
            if rec[_M_N]:
                what += f" and {int(rec[_BAD_MASK])} of {int(rec[_M_N])} mask values"
            self._warn(
                runner,
                name,
                "non-finite",
                f"DeformStatsHook: non-finite offsets or mask in {where} at iteration {it}: {what} are NaN "
                "or inf (a non-finite offset samples zero, a non-finite mask makes the output NaN). Training "
                "has probably diverged: lower the learning rate (of its conv_offset: paramwise_cfg lr_mult) "
                "or clip gradients.",
            )
        elif self.max_offset is not None and mean_abs > self.max_offset:
            self._warn(
                runner,
                name,
                "ran away",
                f"DeformStatsHook: the offsets of {where} ran away at iteration {it}: mean |offset| "
                f"{mean_abs:.4g} px > max_offset={self.max_offset:g} px ({100 * outside:.1f}% of the sampling "
                "points outside the feature map). Lower the learning rate of its conv_offset (paramwise_cfg "
                "lr_mult, the paper's 0.1) or clip gradients.",
            )
        if self.max_outside_ratio is not None and outside > self.max_outside_ratio:
            self._warn(
                runner,
                name,
                "outside",
                f"DeformStatsHook: {100 * outside:.1f}% of the sampling points of {where} fall outside the "
                f"feature map at iteration {it} (> max_outside_ratio={self.max_outside_ratio:g}).",
            )

    def _warn(self, runner, name: str, kind: str, message: str) -> None:
        if (name, kind) in self._warned:
            return
        self._warned.add((name, kind))
        print_log(message, logger=self._logger(runner), level=logging.WARNING)

    @staticmethod
    def _logger(runner):
        return getattr(runner, "logger", None) or "current"
