"""Deformable RoI pooling and its modulated form (DCNv1/DCNv2 heads).

The compiled op is ``torch.ops.mmdcnv2.deform_roi_pool``; this module gives it
autograd, a fake kernel, autocast, the functional form and ``nn.Module`` classes
with mmcv 2.x's names, arguments and state-dict keys. Unlike mmcv's, it runs on
the CPU as well as on CUDA.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ._ext import assert_has_ops, autocast_enabled, check_like_input, has_ops
from ._library import register_autocast, register_autograd, register_fake
from .reference import MAX_ROI_SAMPLES

__all__ = ["deform_roi_pool", "DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPoolPack"]


def deform_roi_pool(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor] = None,
    output_size: Union[int, Tuple[int, int]] = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    r"""Deformable RoI pooling.

    Each output bin is RoIAlign's average of bilinear samples (``sampling_ratio`` per
    axis, adaptive when 0; pixel centres at +0.5 as with ``aligned=True``), the bin
    shifted by ``gamma * (roi_w * offset[k, 0], roi_h * offset[k, 1])``. With no offset
    (or a zero one) it equals ``torchvision.ops.roi_align(..., aligned=True)``.

    Args:
        input (Tensor[N, C, H, W]): feature map.
        rois (Tensor[K, 5]): (batch_index, x1, y1, x2, y2) in image coordinates.
        offset (Tensor[K, 2, PH, PW], optional): per-bin offsets, channel 0 along x,
            channel 1 along y, in units of the RoI's width and height (times gamma).
        output_size (int or (int, int)): (PH, PW).
        spatial_scale (float): feature-map size over image size.
        sampling_ratio (int): samples per bin along each axis, at most 64; 0: ceil(bin size),
            capped at 64 (so that a huge RoI cannot make the op run for ever).
        gamma (float): scale of the offsets.

    Returns:
        Tensor[K, C, PH, PW]
    """
    for name, t in (("input", input), ("rois", rois)):
        if not isinstance(t, Tensor):
            raise TypeError(f"deform_roi_pool: {name} must be a Tensor, got {type(t).__name__}")
    ph, pw = _pair(output_size)
    if input.dim() != 4:
        raise ValueError(f"deform_roi_pool: input must be 4-D (N, C, H, W), got shape {tuple(input.shape)}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(f"deform_roi_pool: rois must have shape (K, 5), got {tuple(rois.shape)}")
    if not 0 <= int(sampling_ratio) <= MAX_ROI_SAMPLES:
        raise ValueError(f"deform_roi_pool: sampling_ratio must lie in [0, {MAX_ROI_SAMPLES}] (0: adaptive), "
                         f"got {sampling_ratio}")
    if offset is not None and tuple(offset.shape) != (rois.shape[0], 2, ph, pw):
        raise ValueError(
            f"deform_roi_pool: offset must have shape {(rois.shape[0], 2, ph, pw)}, got {tuple(offset.shape)}"
        )
    if not autocast_enabled(input.device.type):
        for name, t in (("rois", rois), ("offset", offset)):
            if t is not None and t.dtype != input.dtype:
                raise ValueError(f"deform_roi_pool: {name} has dtype {t.dtype} but input has dtype {input.dtype}")
    assert_has_ops(input)
    return torch.ops.mmdcnv2.deform_roi_pool(
        input, rois, offset, int(ph), int(pw), float(spatial_scale), int(sampling_ratio), float(gamma)
    )


if has_ops():

    def _fake_checks(input, rois, offset, pooled_height, pooled_width):
        """What the compiled op checks, for fake and meta tensors (and for calls that mix a meta tensor
        with real ones, which the dispatcher sends here): the argument's name in every message."""
        torch._check_value(input.dim() == 4, lambda: f"deform_roi_pool: input must be 4-D, got {tuple(input.shape)}")
        torch._check_value(input.dtype.is_floating_point,
                           lambda: f"deform_roi_pool: input must be floating point, got {input.dtype}")
        torch._check_value(rois.dim() == 2 and rois.shape[1] == 5,
                           lambda: f"deform_roi_pool: rois must have shape (K, 5), got {tuple(rois.shape)}")
        torch._check_value(pooled_height >= 1 and pooled_width >= 1, lambda: (
            f"deform_roi_pool: output_size must be >= 1, got ({pooled_height}, {pooled_width})"))
        check_like_input("deform_roi_pool", input, rois=rois, offset=offset)
        if offset is not None:
            want = (rois.shape[0], 2, pooled_height, pooled_width)
            torch._check_value(tuple(offset.shape) == want,
                               lambda: f"deform_roi_pool: offset must have shape {want}, got {tuple(offset.shape)}")

    @register_fake("mmdcnv2::deform_roi_pool")
    def _deform_roi_pool_fake(input, rois, offset, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma):
        _fake_checks(input, rois, offset, pooled_height, pooled_width)
        return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))

    @register_fake("mmdcnv2::deform_roi_pool_backward")
    def _deform_roi_pool_backward_fake(grad_output, input, rois, offset, *args):
        _fake_checks(input, rois, offset, args[0], args[1])
        want = (rois.shape[0], input.shape[1], args[0], args[1])
        torch._check_value(tuple(grad_output.shape) == want and grad_output.device == input.device, lambda: (
            f"deform_roi_pool_backward: grad_output must have shape {want} on {input.device}, "
            f"got {tuple(grad_output.shape)} on {grad_output.device}"))
        goff = input.new_empty(offset.shape) if offset is not None else input.new_empty((0,))
        return input.new_empty(input.shape), goff

    def _setup_context(ctx, inputs, output):
        input, rois, offset, *conf = inputs
        ctx.save_for_backward(input, rois, offset)
        ctx.conf = conf
        ctx.has_offset = offset is not None

    def _backward(ctx, grad_output):
        input, rois, offset = ctx.saved_tensors
        grad_input, grad_offset = torch.ops.mmdcnv2.deform_roi_pool_backward(
            grad_output, input, rois, offset, *ctx.conf
        )
        return (grad_input, None, grad_offset if ctx.has_offset else None) + (None,) * len(ctx.conf)

    register_autograd("mmdcnv2::deform_roi_pool", _backward, _setup_context)
    for _device in ("cpu", "cuda"):
        register_autocast("mmdcnv2::deform_roi_pool", _device, torch.float32)


class DeformRoIPool(nn.Module):
    """Deformable RoI pooling with offsets given to ``forward(input, rois, offset=None)``.

    Shapes as in :func:`deform_roi_pool`.
    """

    def __init__(self, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__()
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        # Under autocast the op computes in float32; the modules hand back the input's dtype
        # (as mmcv's RoI layers do: mmdet's RoI extractors write the result into a buffer of
        # the features' dtype).
        return deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
                               self.gamma).to(input.dtype)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}")


def _fc_branch(in_features: int, hidden: int, out_features: int, layers: int) -> nn.Sequential:
    mods = [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
    if layers == 3:
        mods += [nn.Linear(hidden, hidden), nn.ReLU(inplace=True)]
    mods.append(nn.Linear(hidden, out_features))
    nn.init.zeros_(mods[-1].weight)
    nn.init.zeros_(mods[-1].bias)
    return nn.Sequential(*mods)


class DeformRoIPoolPack(DeformRoIPool):
    """Pools once without offsets, predicts per-bin offsets with ``offset_fc``
    (C*PH*PW -> deform_fc_channels -> deform_fc_channels -> 2*PH*PW, last layer
    zero-initialised) and pools again with them. ``forward(input, rois)``: input
    Tensor[N, output_channels, H, W], rois Tensor[K, 5] -> Tensor[K, output_channels, PH, PW].
    """

    def __init__(self, output_size, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_branch(bins * output_channels, deform_fc_channels, bins * 2, layers=3)

    def _check_channels(self, input: Tensor) -> None:
        if input.dim() != 4 or input.shape[1] != self.output_channels:
            raise ValueError(f"{type(self).__name__}: input must have shape (N, {self.output_channels}, H, W) "
                             f"(output_channels), got {tuple(input.shape)}")

    def _offset(self, pooled: Tensor) -> Tensor:
        return self.offset_fc(pooled.flatten(1)).view(pooled.shape[0], 2, *self.output_size)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        self._check_channels(input)
        pooled = super().forward(input, rois)
        return super().forward(input, rois, self._offset(pooled))


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """``DeformRoIPoolPack`` plus a modulation branch ``mask_fc`` (C*PH*PW ->
    deform_fc_channels -> PH*PW, sigmoid; last linear layer zero-initialised, so every
    bin starts at 0.5) multiplied onto the pooled features."""

    def __init__(self, output_size, output_channels: int, deform_fc_channels: int = 1024,
                 spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1):
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = _fc_branch(bins * output_channels, deform_fc_channels, bins, layers=2)
        self.mask_fc.append(nn.Sigmoid())

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        self._check_channels(input)
        pooled = DeformRoIPool.forward(self, input, rois)
        mask = self.mask_fc(pooled.flatten(1)).view(pooled.shape[0], 1, *self.output_size)
        return (DeformRoIPool.forward(self, input, rois, self._offset(pooled)) * mask).to(input.dtype)
