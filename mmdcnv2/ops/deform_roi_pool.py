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
    r"""Performs deformable RoI pooling (DCNv1, arXiv 1703.06211; with a modulation branch in
    :class:`ModulatedDeformRoIPoolPack`, DCNv2).

    Each output bin is RoIAlign's average of bilinear samples (``sampling_ratio`` per axis, adaptive
    when 0; pixel centres at +0.5 as with ``aligned=True``; samples within one pixel outside the map
    are clamped to its border, farther ones read 0), the bin shifted by
    ``gamma * (roi_w * offset[k, 0], roi_h * offset[k, 1])``. With no offset (or a zero one) it equals
    ``torchvision.ops.roi_align(..., aligned=True)``. mmcv 2.x's ``mmcv.ops.deform_roi_pool`` has the
    same arguments; unlike mmcv's it runs on the CPU, and it does not extrapolate at the map border.

    Args:
        input (Tensor[N, C, H, W]): feature map.
        rois (Tensor[K, 5]): (batch_index, x1, y1, x2, y2) in image coordinates; the input's dtype.
        offset (Tensor[K, 2, PH, PW], optional): per-bin offsets, channel 0 along x, channel 1 along y,
            in units of the RoI's width and height (times ``gamma``). Default: ``None`` (no offsets).
        output_size (int or (int, int)): (PH, PW), >= 1. Default: 7.
        spatial_scale (float): feature-map size over image size, positive and finite. Default: 1.0.
        sampling_ratio (int): samples per bin along each axis, in [0, 64]; 0: ceil(bin size), capped at
            64 (so that a huge RoI cannot make the op run for ever). Default: 0.
        gamma (float): scale of the offsets, finite. Default: 0.1.

    Dtypes and devices: float32, float64, float16 and bfloat16, ``rois`` and ``offset`` of the input's
    dtype and on its device; float16 and bfloat16 are computed in float32 and returned in their own
    dtype. CPU always; CUDA when mmdcnv2 was built with CUDA kernels (:func:`has_cuda_kernels`). Under
    ``torch.autocast`` (CPU or CUDA) the op computes in float32 and returns float32, whatever the
    (floating) dtypes of the tensors (float64 ones are left as they are on torch >= 2.5 and cast on
    older torch, as in :func:`deform_conv2d`); the modules cast the result back to the input's dtype.
    Differentiable in ``input`` and ``offset`` (``rois`` gets no gradient). A RoI with a non-finite
    coordinate pools nothing (zeros, zero gradient); a non-finite offset moves its bin off the map.

    Returns:
        Tensor[K, C, PH, PW], plain contiguous (NCHW) whatever the input's memory format.

    Raises:
        TypeError: ``input`` or ``rois`` is not a Tensor.
        ValueError: a malformed argument, with its name in the message: ``input`` not 4-D or not
            floating point, ``rois`` not of shape (K, 5), ``offset`` not of shape (K, 2, PH, PW),
            ``output_size`` < 1, ``sampling_ratio`` outside [0, 64], ``spatial_scale`` not positive and
            finite, ``gamma`` not finite, ``rois`` or ``offset`` on another device than ``input`` or
            (outside autocast) of another dtype, an output size that overflows 64-bit integers. On the
            CPU also a batch index (``rois[:, 0]``) outside [0, N), NaN included; the CUDA kernels give
            such a RoI zeros instead. The compiled op and the fake kernels (``torch.compile``,
            ``torch.export``, meta tensors) check again; their errors are ValueErrors too.
        RuntimeError: the compiled ops are not built or do not load, or ``input`` is a CUDA tensor and
            mmdcnv2 was built without CUDA kernels; the message says what to run. On torch < 2.4, a call
            on fake or meta tensors (``torch.compile``, ``torch.export``, ``torch.library.opcheck``)
            raises a ``RuntimeError`` naming torch >= 2.4. The CUDA backward pass under
            ``torch.use_deterministic_algorithms(True)`` raises PyTorch's nondeterminism error.

    ONNX has no deformable RoI pooling operator: exporting a model that calls this op raises
    :class:`UnsupportedONNXOperatorError` (:func:`export_onnx`).

    Example::

        >>> import torch
        >>> from mmdcnv2.ops import deform_roi_pool
        >>> feat = torch.rand(2, 16, 32, 32)                  # stride 4: a 128 x 128 image
        >>> rois = torch.tensor([[0, 4.0, 4.0, 60.0, 80.0], [1, 10.0, 20.0, 100.0, 90.0]])
        >>> offset = torch.zeros(2, 2, 7, 7)
        >>> deform_roi_pool(feat, rois, offset, output_size=7, spatial_scale=1 / 4, sampling_ratio=2).shape
        torch.Size([2, 16, 7, 7])
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
        raise ValueError(
            f"deform_roi_pool: sampling_ratio must lie in [0, {MAX_ROI_SAMPLES}] (0: adaptive), got {sampling_ratio}"
        )
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
        torch._check_value(
            input.dtype.is_floating_point, lambda: f"deform_roi_pool: input must be floating point, got {input.dtype}"
        )
        torch._check_value(
            rois.dim() == 2 and rois.shape[1] == 5,
            lambda: f"deform_roi_pool: rois must have shape (K, 5), got {tuple(rois.shape)}",
        )
        torch._check_value(
            pooled_height >= 1 and pooled_width >= 1,
            lambda: (f"deform_roi_pool: output_size must be >= 1, got ({pooled_height}, {pooled_width})"),
        )
        check_like_input("deform_roi_pool", input, rois=rois, offset=offset)
        if offset is not None:
            want = (rois.shape[0], 2, pooled_height, pooled_width)
            torch._check_value(
                tuple(offset.shape) == want,
                lambda: f"deform_roi_pool: offset must have shape {want}, got {tuple(offset.shape)}",
            )

    @register_fake("mmdcnv2::deform_roi_pool")
    def _deform_roi_pool_fake(input, rois, offset, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma):
        _fake_checks(input, rois, offset, pooled_height, pooled_width)
        return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))

    @register_fake("mmdcnv2::deform_roi_pool_backward")
    def _deform_roi_pool_backward_fake(grad_output, input, rois, offset, *args):
        _fake_checks(input, rois, offset, args[0], args[1])
        want = (rois.shape[0], input.shape[1], args[0], args[1])
        torch._check_value(
            tuple(grad_output.shape) == want and grad_output.device == input.device,
            lambda: (
                f"deform_roi_pool_backward: grad_output must have shape {want} on {input.device}, "
                f"got {tuple(grad_output.shape)} on {grad_output.device}"
            ),
        )
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
    """Deformable RoI pooling whose offsets are given to ``forward(input, rois, offset=None)``.

    mmcv 2.x's ``mmcv.ops.DeformRoIPool``: the same arguments, no parameters (an empty state dict).
    Registered as ``mmdcnv2.DeformRoIPool`` where mmdet is installed (a ``roi_layer`` of
    ``mmdcnv2.DeformRoIExtractor``). The computation is :func:`deform_roi_pool`.

    Args:
        output_size (int or (int, int)): (PH, PW).
        spatial_scale (float): feature-map size over image size. Default: 1.0.
        sampling_ratio (int): samples per bin along each axis, in [0, 64] (0: adaptive). Default: 0.
        gamma (float): scale of the offsets. Default: 0.1.

    Shape:
        - input: Tensor[N, C, H, W]
        - rois: Tensor[K, 5], (batch_index, x1, y1, x2, y2) in image coordinates
        - offset: Tensor[K, 2, PH, PW], optional
        - output: Tensor[K, C, PH, PW], in the input's dtype (under autocast too, as mmcv's RoI layers:
          mmdet's RoI extractors write it into a buffer of the features' dtype)
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
        return deform_roi_pool(
            input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma
        ).to(input.dtype)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


def _fc_branch(in_features: int, hidden: int, out_features: int, layers: int) -> nn.Sequential:
    mods = [nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
    if layers == 3:
        mods += [nn.Linear(hidden, hidden), nn.ReLU(inplace=True)]
    mods.append(nn.Linear(hidden, out_features))
    nn.init.zeros_(mods[-1].weight)
    nn.init.zeros_(mods[-1].bias)
    return nn.Sequential(*mods)


class DeformRoIPoolPack(DeformRoIPool):
    """Deformable RoI pooling that predicts its own offsets (DCNv1's deformable RoI pooling).

    mmcv 2.x's ``mmcv.ops.DeformRoIPoolPack``: the same arguments, layers, initialisation and
    state-dict keys. Registered as ``mmdcnv2.DeformRoIPoolPack`` where mmdet is installed (a
    ``roi_layer`` of ``mmdcnv2.DeformRoIExtractor``, which fills in ``spatial_scale``).

    ``forward(input, rois)`` pools once without offsets, predicts per-bin offsets with ``offset_fc``
    (Linear C*PH*PW -> deform_fc_channels, ReLU, Linear -> deform_fc_channels, ReLU, Linear -> 2*PH*PW;
    the last layer zero-initialised, so a new layer pools as RoIAlign) and pools again with them.

    Args:
        output_size (int or (int, int)): (PH, PW).
        output_channels (int): channels C of the input (and output).
        deform_fc_channels (int): width of ``offset_fc``'s hidden layers. Default: 1024.
        spatial_scale, sampling_ratio, gamma: as in :class:`DeformRoIPool`.

    Shape:
        - input: Tensor[N, output_channels, H, W]
        - rois: Tensor[K, 5], (batch_index, x1, y1, x2, y2) in image coordinates
        - output: Tensor[K, output_channels, PH, PW], in the input's dtype

    State dict: ``offset_fc.{0,2,4}.weight`` and ``.bias`` (mmcv's keys). The fc layers' other
    parameters keep ``nn.Linear``'s default initialisation.

    Raises:
        ValueError: in ``forward``, an input that is not of shape (N, output_channels, H, W) (mmcv asserts).
    """

    def __init__(
        self,
        output_size,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ):
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = output_channels
        self.deform_fc_channels = deform_fc_channels
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_branch(bins * output_channels, deform_fc_channels, bins * 2, layers=3)

    def _check_channels(self, input: Tensor) -> None:
        if input.dim() != 4 or input.shape[1] != self.output_channels:
            raise ValueError(
                f"{type(self).__name__}: input must have shape (N, {self.output_channels}, H, W) "
                f"(output_channels), got {tuple(input.shape)}"
            )

    def _offset(self, pooled: Tensor) -> Tensor:
        return self.offset_fc(pooled.flatten(1)).view(pooled.shape[0], 2, *self.output_size)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        self._check_channels(input)
        pooled = super().forward(input, rois)
        return super().forward(input, rois, self._offset(pooled))


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """Modulated deformable RoI pooling (DCNv2's): :class:`DeformRoIPoolPack` plus a modulation branch.

    mmcv 2.x's ``mmcv.ops.ModulatedDeformRoIPoolPack``: the same arguments, layers, initialisation
    and state-dict keys. Registered as ``mmdcnv2.ModulatedDeformRoIPoolPack`` where mmdet is
    installed (a ``roi_layer`` of ``mmdcnv2.DeformRoIExtractor``).

    ``forward(input, rois)`` pools once without offsets; from that, ``offset_fc`` predicts the offsets
    and ``mask_fc`` (Linear C*PH*PW -> deform_fc_channels, ReLU, Linear -> PH*PW, Sigmoid; the last
    linear layer zero-initialised, so every bin starts at 0.5) a modulation per bin; it pools again
    with the offsets and multiplies the result by the modulation.

    Args, shapes: as in :class:`DeformRoIPoolPack`.

    State dict: ``offset_fc.{0,2,4}.weight`` and ``.bias``, ``mask_fc.{0,2}.weight`` and ``.bias``
    (mmcv's keys).

    Raises:
        ValueError: in ``forward``, an input that is not of shape (N, output_channels, H, W) (mmcv asserts).
    """

    def __init__(
        self,
        output_size,
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ):
        super().__init__(output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma)
        bins = self.output_size[0] * self.output_size[1]
        self.mask_fc = _fc_branch(bins * output_channels, deform_fc_channels, bins, layers=2)
        self.mask_fc.append(nn.Sigmoid())

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        self._check_channels(input)
        pooled = DeformRoIPool.forward(self, input, rois)
        mask = self.mask_fc(pooled.flatten(1)).view(pooled.shape[0], 1, *self.output_size)
        return (DeformRoIPool.forward(self, input, rois, self._offset(pooled)) * mask).to(input.dtype)
