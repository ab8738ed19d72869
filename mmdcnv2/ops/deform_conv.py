"""Deformable convolution (DCNv1) and modulated deformable convolution (DCNv2).

The compiled op is ``torch.ops.mmdcnv2.deform_conv2d``; this module gives it
autograd, a fake (meta) kernel for torch.compile and export, autocast, a
functional form with torchvision's arguments and ``nn.Module`` classes with
mmcv 2.x's names, arguments, initialisation and state-dict keys.
"""

import functools
import math
import warnings
import weakref
from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair, _single

from ._ext import assert_has_ops, autocast_enabled, check_like_input, has_ops
from ._library import register_autocast, register_autograd, register_fake

IntPair = Union[int, Tuple[int, int]]

__all__ = [
    "deform_conv2d",
    "DeformConv2d",
    "DeformConv2dPack",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
]


def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _check_args(input, offset, weight, bias, stride, padding, dilation, mask):
    """Python-side validation with the argument's name and the expected shape."""
    for name, t in (("input", input), ("offset", offset), ("weight", weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"deform_conv2d: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"deform_conv2d: {name} must be 4-D, got shape {tuple(t.shape)}")
    for name, v, lowest in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or any(int(e) != e or e < lowest for e in v):
            raise ValueError(f"deform_conv2d: {name} must be integers >= {lowest}, got {v}")
    C = input.shape[1]
    Cout, Cg, kh, kw = weight.shape
    K = kh * kw
    if Cg == 0 or C % Cg != 0:
        raise ValueError(
            f"deform_conv2d: input channels ({C}) must be a multiple of weight.shape[1] ({Cg}); "
            f"weight must have shape (C_out, C_in / groups, kH, kW), got {tuple(weight.shape)}"
        )
    groups = C // Cg
    if Cout % groups != 0:
        raise ValueError(f"deform_conv2d: weight's output channels ({Cout}) must be divisible by groups ({groups})")
    if offset.shape[1] == 0 or offset.shape[1] % (2 * K) != 0:
        raise ValueError(
            f"deform_conv2d: offset must have 2 * deform_groups * kH * kW channels (a multiple of {2 * K}), "
            f"got offset shape {tuple(offset.shape)}"
        )
    dg = offset.shape[1] // (2 * K)
    if C % dg != 0:
        raise ValueError(f"deform_conv2d: input channels ({C}) must be divisible by deform_groups ({dg})")
    Ho = _conv_out(input.shape[2], kh, stride[0], padding[0], dilation[0])
    Wo = _conv_out(input.shape[3], kw, stride[1], padding[1], dilation[1])
    if Ho <= 0 or Wo <= 0:
        raise ValueError(
            f"deform_conv2d: the padded input {tuple(input.shape[2:])} + 2 * {tuple(padding)} is smaller "
            f"than the dilated kernel ({kh}, {kw}) with dilation {tuple(dilation)}"
        )
    want = (input.shape[0], 2 * dg * K, Ho, Wo)
    if tuple(offset.shape) != want:
        raise ValueError(f"deform_conv2d: offset must have shape {want}, got {tuple(offset.shape)}")
    if mask is not None:
        want_mask = (input.shape[0], dg * K, Ho, Wo)
        if tuple(mask.shape) != want_mask:
            raise ValueError(f"deform_conv2d: mask must have shape {want_mask}, got {tuple(mask.shape)}")
    if bias is not None and tuple(bias.shape) != (Cout,):
        raise ValueError(f"deform_conv2d: bias must have shape ({Cout},), got {tuple(bias.shape)}")
    # under autocast, the dispatcher casts every floating input to float32 before the kernel runs
    autocast = autocast_enabled(input.device.type)
    for name, t in (("weight", weight), ("offset", offset), ("mask", mask), ("bias", bias)):
        if t is None:
            continue
        if t.device != input.device:
            raise ValueError(f"deform_conv2d: {name} is on {t.device} but input is on {input.device}")
        if t.dtype != input.dtype and not autocast:
            raise ValueError(f"deform_conv2d: {name} has dtype {t.dtype} but input has dtype {input.dtype}")
    return groups, dg, Ho, Wo


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    r"""Performs deformable convolution: DCNv2 (modulated, arXiv 1811.11168) when ``mask`` is given,
    DCNv1 (arXiv 1703.06211) when it is ``None``.

    Same arguments, layouts and semantics as ``torchvision.ops.deform_conv2d``; the result's memory
    format is the input's (see Returns). ``groups`` is inferred as ``C_in // weight.shape[1]`` and the
    deform groups ``dg`` as ``offset.shape[1] // (2 * kH * kW)``.

    Args:
        input (Tensor[N, C_in, H, W]): input features.
        offset (Tensor[N, 2 * dg * kH * kW, H_out, W_out]): sampling offsets, in pixels of ``input``;
            channel ``2 * (g * kH * kW + k)`` is the row (dy) offset of deform group g and kernel tap k
            (row-major over the kernel), the next channel the column (dx) offset. Each deform group
            serves ``C_in // dg`` consecutive input channels.
        weight (Tensor[C_out, C_in / groups, kH, kW]): convolution weight.
        bias (Tensor[C_out], optional): added to every output position. Default: ``None``.
        stride (int or (int, int)): distance between convolution centres, >= 1. Default: 1.
        padding (int or (int, int)): zero padding on each side, >= 0. Default: 0.
        dilation (int or (int, int)): spacing between kernel taps, >= 1. Default: 1.
        mask (Tensor[N, dg * kH * kW, H_out, W_out], optional): modulation scalar of every sample
            (DCNv2), channel ``g * kH * kW + k``. Default: ``None``.

    ``H_out = (H + 2 * padding - dilation * (kH - 1) - 1) // stride + 1`` (likewise ``W_out``), as in
    ``torch.nn.functional.conv2d``. Samples are bilinear with zero outside the map: a sample position
    with -1 < y < H and -1 < x < W counts, any other (non-finite included) reads 0 and has zero gradient.

    Dtypes and devices: float32, float64, float16 and bfloat16, every tensor of the input's dtype and on
    its device; float16 and bfloat16 accumulate in float32 and are returned in their own dtype. CPU
    always; CUDA when mmdcnv2 was built with CUDA kernels (:func:`has_cuda_kernels`). Under
    ``torch.autocast`` (CPU or CUDA) the op computes in float32, like torchvision's: the tensors may come
    in mixed floating dtypes, are cast to float32, and the result is float32 (float64 tensors are left
    as they are, as autocast does). Differentiable in ``input``, ``offset``, ``weight``, ``mask`` and ``bias``.

    Returns:
        Tensor[N, C_out, H_out, W_out], in the input's memory format, as ``torch.nn.functional.conv2d``:
        channels-last out (and channels-last input gradient) for an input that is channels-last and not
        also plain contiguous, plain contiguous otherwise (torchvision and mmcv always return plain
        NCHW). A channels-last input saves the CPU kernels the copies of the input they make of plain NCHW data.

    Raises:
        TypeError: ``input``, ``offset`` or ``weight`` is not a Tensor.
        ValueError: an argument is malformed, with its name in the message: a tensor that is not 4-D,
            ``stride``/``padding``/``dilation`` that are not two integers >= 1 (>= 0 for padding) and
            <= 2^31 - 1, input channels that are not a multiple of ``weight.shape[1]`` or of ``dg``,
            ``offset``/``mask``/``bias`` of the wrong shape, a padded input smaller than the dilated
            kernel, a tensor on another device than ``input`` or (outside autocast) of another dtype, a
            non-floating-point ``input``, or sizes that overflow 64-bit integers. The compiled op checks
            again, and so do the fake kernels (``torch.compile``, ``torch.export``, meta tensors): their
            errors are ValueErrors too.
        RuntimeError: the compiled ops are not built or do not load, or ``input`` is a CUDA tensor and
            mmdcnv2 was built without CUDA kernels; the message says what to run. On torch < 2.4 (no
            ``torch.library.register_fake``), a call on fake or meta tensors (``torch.compile``,
            ``torch.export``, ``torch.library.opcheck``, the dynamo ONNX exporter) raises a
            ``RuntimeError`` naming torch >= 2.4 (``torch.compile`` and ``torch.export`` may wrap it in
            an error of their own that carries the message). The CUDA backward pass under
            ``torch.use_deterministic_algorithms(True)`` raises PyTorch's nondeterminism error (it
            scatters with atomics; the CPU backward pass is deterministic).

    Example::

        >>> import torch
        >>> from mmdcnv2.ops import deform_conv2d
        >>> input = torch.rand(4, 3, 10, 10)
        >>> kh, kw = 3, 3
        >>> weight = torch.rand(5, 3, kh, kw)
        >>> # offset and mask have the spatial size of the output: here 10 - 3 + 1 = 8
        >>> offset = torch.rand(4, 2 * kh * kw, 8, 8)
        >>> mask = torch.rand(4, kh * kw, 8, 8)
        >>> out = deform_conv2d(input, offset, weight, mask=mask)
        >>> out.shape
        torch.Size([4, 5, 8, 8])
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    groups, dg, _, _ = _check_args(input, offset, weight, bias, stride, padding, dilation, mask)
    assert_has_ops(input)
    return torch.ops.mmdcnv2.deform_conv2d(
        input, weight, offset, mask, bias, list(stride), list(padding), list(dilation), groups, dg
    )


# --- torch.library registrations: fake kernels, autograd, autocast ---------------------------------

if has_ops():

    def _fake_checks(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups):
        """What the compiled op checks, for fake and meta tensors (and for calls that mix a meta tensor
        with real ones, which the dispatcher sends here): the argument's name in every message."""
        for name, t in (("input", input), ("weight", weight), ("offset", offset)):
            torch._check_value(t.dim() == 4, lambda: f"deform_conv2d: {name} must be 4-D, got shape {tuple(t.shape)}")
        check_like_input("deform_conv2d", input, weight=weight, offset=offset, mask=mask, bias=bias)
        torch._check_value(
            input.dtype.is_floating_point,
            lambda: f"deform_conv2d: input must be a floating-point tensor, got {input.dtype}",
        )
        torch._check_value(
            groups >= 1 and deform_groups >= 1,
            lambda: f"deform_conv2d: groups ({groups}) and deform_groups ({deform_groups}) must be >= 1",
        )
        torch._check_value(
            weight.shape[1] * groups == input.shape[1],
            lambda: (
                f"deform_conv2d: weight must have shape (C_out, C_in / groups, kH, kW) for {input.shape[1]} input "
                f"channels and groups={groups}, got {tuple(weight.shape)}"
            ),
        )
        Ho = _conv_out(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
        Wo = _conv_out(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
        torch._check_value(
            Ho > 0 and Wo > 0, lambda: "deform_conv2d: the padded input is smaller than the dilated kernel"
        )
        K = weight.shape[2] * weight.shape[3]
        want = (input.shape[0], 2 * deform_groups * K, Ho, Wo)
        torch._check_value(
            tuple(offset.shape) == want,
            lambda: f"deform_conv2d: offset must have shape {want}, got {tuple(offset.shape)}",
        )
        if mask is not None:
            want = (input.shape[0], deform_groups * K, Ho, Wo)
            torch._check_value(
                tuple(mask.shape) == want,
                lambda: f"deform_conv2d: mask must have shape {want}, got {tuple(mask.shape)}",
            )
        if bias is not None:
            torch._check_value(
                tuple(bias.shape) == (weight.shape[0],),
                lambda: (f"deform_conv2d: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}"),
            )
        return Ho, Wo

    def _result_format(input):
        """The memory format of the output and grad_input: channels-last for an input that is channels-last
        contiguous and not also plain contiguous, plain contiguous otherwise (the compiled op's rule)."""
        if not input.is_contiguous() and input.is_contiguous(memory_format=torch.channels_last):
            return torch.channels_last
        return torch.contiguous_format

    @register_fake("mmdcnv2::deform_conv2d")
    def _deform_conv2d_fake(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups):
        Ho, Wo = _fake_checks(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups)
        return input.new_empty((input.shape[0], weight.shape[0], Ho, Wo)).contiguous(
            memory_format=_result_format(input)
        )

    @register_fake("mmdcnv2::deform_conv2d_backward")
    def _deform_conv2d_backward_fake(
        grad_output, input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups
    ):
        Ho, Wo = _fake_checks(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups)
        want = (input.shape[0], weight.shape[0], Ho, Wo)
        torch._check_value(
            tuple(grad_output.shape) == want and grad_output.device == input.device,
            lambda: (
                f"deform_conv2d_backward: grad_output must have shape {want} on {input.device}, "
                f"got {tuple(grad_output.shape)} on {grad_output.device}"
            ),
        )
        grad_mask = input.new_empty(mask.shape) if mask is not None else input.new_empty((0,))
        grad_bias = input.new_empty(bias.shape) if bias is not None else input.new_empty((0,))
        return (
            input.new_empty(input.shape).contiguous(memory_format=_result_format(input)),
            input.new_empty(weight.shape),
            input.new_empty(offset.shape),
            grad_mask,
            grad_bias,
        )

    def _setup_context(ctx, inputs, output):
        input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups = inputs
        ctx.save_for_backward(input, weight, offset, mask, bias)
        ctx.conf = (stride, padding, dilation, groups, deform_groups)
        ctx.has_mask = mask is not None
        ctx.has_bias = bias is not None

    def _backward(ctx, grad_output):
        input, weight, offset, mask, bias = ctx.saved_tensors
        gi, gw, go, gm, gb = torch.ops.mmdcnv2.deform_conv2d_backward(
            grad_output, input, weight, offset, mask, bias, *ctx.conf
        )
        return (
            gi,
            gw,
            go,
            gm if ctx.has_mask else None,
            gb if ctx.has_bias else None,
            None,
            None,
            None,
            None,
            None,
        )

    register_autograd("mmdcnv2::deform_conv2d", _backward, _setup_context)
    # Under autocast the op runs in float32 (like torchvision's), on either device.
    for _device in ("cpu", "cuda"):
        register_autocast("mmdcnv2::deform_conv2d", _device, torch.float32)


# --- nn.Modules (mmcv 2.x names, arguments, initialisation and state-dict keys) ---------------------


def _accepts_deformable_groups(cls_name: str):
    """``__init__`` also takes mmcv's deprecated keyword ``deformable_groups`` for ``deform_groups``,
    with the ``DeprecationWarning`` that mmcv's ``deprecated_api_warning`` gives."""

    def wrap(init):
        @functools.wraps(init)
        def new_init(self, *args, **kwargs):
            if "deformable_groups" in kwargs:
                if "deform_groups" in kwargs:
                    raise TypeError(
                        f"{cls_name}.__init__: give deform_groups or its deprecated name deformable_groups, not both"
                    )
                warnings.warn(
                    f'"deformable_groups" is deprecated in `{cls_name}.__init__`, please use "deform_groups" instead',
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs["deform_groups"] = kwargs.pop("deformable_groups")
            init(self, *args, **kwargs)

        return new_init

    return wrap


# mmcv < 2 (mmdet 1.x checkpoints) saved a Pack's offset conv as a sibling, ``<name>_offset.*``, where
# mmcv 2 has ``<name>.conv_offset.*``; mmcv's Pack classes rename the keys in ``_load_from_state_dict``
# when the module's saved version is below 2. That never triggers with current torch (and mmengine's
# loader): both hand a child only the keys under its own prefix, so the sibling key is invisible to it.
# The rename has to happen one level up, in the parent: whenever a Pack module becomes a child of a
# module, that parent gets a load_state_dict pre-hook that renames the keys of its Pack children before
# the parent checks for unexpected keys and before the children's keys are filtered.

_PARENTS_WITH_KEY_HOOK: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_OLD_OFFSET_SUFFIXES = ("weight", "bias")


def _rename_old_offset_keys(parent: nn.Module, state_dict, prefix: str, local_metadata, *args) -> None:
    """``<name>_offset.*`` -> ``<name>.conv_offset.*`` for each Pack child, when the new key is absent (mmcv's
    rule). mmcv also asks the child's saved version to be below 2; a parent sees the saved metadata only when
    it is the module being loaded (torch hands nested modules plain dicts), so deeper down the keys decide
    alone: a version-2 checkpoint never holds ``<name>_offset.*`` for a Pack layer."""
    metadata = getattr(state_dict, "_metadata", None)
    for name, child in parent._modules.items():
        if not isinstance(child, _PackVersion) or name + "_offset" in parent._modules:
            continue
        if metadata is not None:
            version = metadata.get(prefix + name, {}).get("version")
            if version is not None and version >= 2:
                continue
        for suffix in _OLD_OFFSET_SUFFIXES:
            old, new = f"{prefix}{name}_offset.{suffix}", f"{prefix}{name}.conv_offset.{suffix}"
            if old in state_dict and new not in state_dict:
                state_dict[new] = state_dict.pop(old)


def _watch_pack_children(parent: nn.Module, name: str, child) -> None:
    if isinstance(child, _PackVersion) and parent not in _PARENTS_WITH_KEY_HOOK:
        _PARENTS_WITH_KEY_HOOK.add(parent)
        parent._register_load_state_dict_pre_hook(_rename_old_offset_keys, with_module=True)


class _PackVersion:
    """Marks the Pack modules: state-dict version 2 (mmcv's), old offset keys renamed on load."""

    _version = 2


torch.nn.modules.module.register_module_module_registration_hook(_watch_pack_children)


def _check_channels(in_channels, out_channels, groups, deform_groups):
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"in_channels ({in_channels}) and out_channels ({out_channels}) must be divisible by groups ({groups})"
        )
    if deform_groups < 1 or in_channels % deform_groups:
        raise ValueError(f"in_channels ({in_channels}) must be divisible by deform_groups ({deform_groups})")


def _sampling_layout(x: Tensor) -> Tuple[Tensor, bool]:
    """The input the Pack layers give ``conv_offset`` and the op: on the CPU, a channels-last copy of a plain
    NCHW input (and whether it is one). Both then run on channels-last data - oneDNN's convolutions are
    faster on it, and our CPU kernels sample it in place - and the backward reuses the copy: one layout
    conversion per layer instead of one in each op and another in the backward. It costs one saved
    activation per layer (the copy) until the backward."""
    if x.device.type != "cpu" or x.dim() != 4 or x.is_contiguous(memory_format=torch.channels_last):
        return x, False
    return _ChannelsLastCopy.apply(x), True


class _ChannelsLastCopy(torch.autograd.Function):
    """x.contiguous(memory_format=channels_last) whose gradient comes back plain contiguous: the caller's
    gradient keeps the caller's layout (a plain ``contiguous`` would hand it a channels-last one)."""

    @staticmethod
    def forward(ctx, x):
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _DeformConvNd(nn.Module):
    """Arguments, weight and bias shared by the two convolution modules."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups, bias):
        super().__init__()
        _check_channels(in_channels, out_channels, groups, deform_groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.deform_groups = deform_groups
        # attributes that nn.Conv2d has and that mmcv's ConvModule and friends read
        self.transposed = False
        self.output_padding = _single(0)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)

    def _make_conv_offset(self, per_tap: int) -> nn.Conv2d:
        """The zero-initialised conv that predicts ``per_tap`` channels per kernel tap and deform group."""
        conv = nn.Conv2d(
            self.in_channels,
            self.deform_groups * per_tap * self.kernel_size[0] * self.kernel_size[1],
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
        )
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
            f"deform_groups={self.deform_groups}, bias={self.bias is not None}"
        )


class DeformConv2d(_DeformConvNd):
    r"""Deformable convolution (DCNv1) whose offsets are given to ``forward(x, offset)``.

    mmcv 2.x's ``mmcv.ops.DeformConv2d``: the same arguments (mmcv's deprecated keyword
    ``deformable_groups`` too, with mmcv's ``DeprecationWarning``), parameter, initialisation and
    state-dict keys. The computation is :func:`deform_conv2d`.

    Args:
        in_channels (int): channels of the input.
        out_channels (int): channels of the output.
        kernel_size (int or (int, int)): (kH, kW).
        stride, padding, dilation (int or (int, int)): as in ``nn.Conv2d``. Defaults: 1, 0, 1.
        groups (int): convolution groups; must divide ``in_channels`` and ``out_channels``. Default: 1.
        deform_groups (int): offset groups, must divide ``in_channels``; each serves
            ``in_channels // deform_groups`` consecutive channels. Default: 1. (``forward`` takes the
            number of groups from the offset's shape; this one sizes a Pack layer's ``conv_offset``.)
        bias (bool): must be False (as in mmcv); use ``ModulatedDeformConv2d`` for a bias.
        im2col_step (int): accepted for compatibility with mmcv and ignored: the blocking is automatic.

    Shape:
        - x: Tensor[N, in_channels, H, W]
        - offset: Tensor[N, 2 * deform_groups * kH * kW, H_out, W_out] (layout of :func:`deform_conv2d`)
        - output: Tensor[N, out_channels, H_out, W_out], in x's memory format; float32 under autocast

    Parameters and state dict: ``weight`` (Tensor[out_channels, in_channels // groups, kH, kW]),
    initialised by ``nn.init.kaiming_uniform_(weight, nonlinearity='relu')`` as mmcv 2.x's
    ``reset_parameters``; no bias. It has ``nn.Conv2d``'s attributes that mmcv's ``ConvModule`` reads
    (``in_channels``, ``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation``,
    ``groups``, ``transposed``, ``output_padding``).

    Raises:
        ValueError: ``bias=True``, or channels not divisible by ``groups`` / ``deform_groups``.
        TypeError: both ``deform_groups`` and ``deformable_groups`` given.
    """

    @_accepts_deformable_groups("DeformConv2d")
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        im2col_step: int = 32,
    ) -> None:
        if bias:
            raise ValueError(f"bias={bias} is not supported in DeformConv2d")
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups, False
        )
        self.im2col_step = im2col_step
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``weight`` from ``nn.init.kaiming_uniform_(nonlinearity='relu')`` (mmcv 2.x's initialisation)."""
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        """:func:`deform_conv2d` of ``x`` (Tensor[N, in_channels, H, W]) with ``offset``
        (Tensor[N, 2 * dg * kH * kW, H_out, W_out]) and the layer's weight, stride, padding and dilation."""
        return deform_conv2d(x, offset, self.weight, None, self.stride, self.padding, self.dilation)


class DeformConv2dPack(_PackVersion, DeformConv2d):
    """``DeformConv2d`` that predicts its own offsets: ``forward(x)``, x Tensor[N, in_channels, H, W].

    mmcv 2.x's ``mmcv.ops.DeformConv2dPack``, which mmcv registers as ``DCN``. In mmdcnv2's registry
    (where mmdet is installed) ``type='mmdcnv2.DCN'`` builds the subclass :class:`mmdcnv2.models.DCN` and
    ``type='mmdcnv2.DeformConv2dPack'`` this class. The arguments are ``DeformConv2d``'s.
    ``conv_offset`` is an ``nn.Conv2d(in_channels, 2 * deform_groups * kH * kW)`` with the layer's
    kernel size, stride, padding and dilation and a bias, zero-initialised (``init_offset()`` zeroes it
    again), so a new layer samples the regular grid and computes the plain convolution of its ``weight``.

    State dict: ``weight``, ``conv_offset.weight``, ``conv_offset.bias`` (mmcv's keys, version 2). The
    keys of mmcv < 2 checkpoints (mmdet 1.x), ``<name>_offset.*`` beside the layer, are renamed to
    ``<name>.conv_offset.*`` on load, by a pre-hook of the parent module.

    On the CPU a plain NCHW ``x`` is copied once to channels-last for ``conv_offset`` and the op, and
    the output is handed back plain contiguous: the caller's memory format.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = self._make_conv_offset(2)

    def init_offset(self) -> None:
        """Zeroes ``conv_offset`` (mmcv's ``init_offset``): zero offsets, the regular grid."""
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Offsets from ``conv_offset(x)``, then :func:`deform_conv2d`: Tensor[N, in_channels, H, W] ->
        Tensor[N, out_channels, H_out, W_out], in x's memory format."""
        xs, converted = _sampling_layout(x)
        out = super().forward(xs, self.conv_offset(xs))
        return out.contiguous() if converted else out  # the caller's layout


class ModulatedDeformConv2d(_DeformConvNd):
    r"""Modulated deformable convolution (DCNv2) whose offsets and mask are given to
    ``forward(x, offset, mask)``.

    mmcv 2.x's ``mmcv.ops.ModulatedDeformConv2d``: the same arguments (mmcv's deprecated keyword
    ``deformable_groups`` too, with mmcv's ``DeprecationWarning``), parameters, initialisation and
    state-dict keys. The computation is :func:`deform_conv2d` with ``mask``.

    Args:
        in_channels (int): channels of the input.
        out_channels (int): channels of the output.
        kernel_size (int or (int, int)): (kH, kW).
        stride, padding, dilation (int or (int, int)): as in ``nn.Conv2d``. Defaults: 1, 0, 1.
        groups (int): convolution groups; must divide ``in_channels`` and ``out_channels``. Default: 1.
        deform_groups (int): offset groups, must divide ``in_channels``; the channels of a group share
            offsets and mask. Default: 1. (``forward`` takes the number of groups from the offset's
            shape; this one sizes a Pack layer's ``conv_offset``.)
        bias (bool or str): learn an additive bias (any true value, as mmcv's ``bool(bias)``). Default: True.

    Shape:
        - x: Tensor[N, in_channels, H, W]
        - offset: Tensor[N, 2 * deform_groups * kH * kW, H_out, W_out] (layout of :func:`deform_conv2d`)
        - mask: Tensor[N, deform_groups * kH * kW, H_out, W_out] (values usually in [0, 1])
        - output: Tensor[N, out_channels, H_out, W_out], in x's memory format; float32 under autocast

    Parameters and state dict: ``weight`` (Tensor[out_channels, in_channels // groups, kH, kW]) and,
    with ``bias``, ``bias`` (Tensor[out_channels]). ``init_weights()`` (mmcv's initialisation, run by
    the constructor): weight uniform in +-1 / sqrt(in_channels * kH * kW), bias zero. It has the
    ``nn.Conv2d`` attributes that mmcv's ``ConvModule`` reads, as ``DeformConv2d``.

    Raises:
        ValueError: channels not divisible by ``groups`` / ``deform_groups``.
        TypeError: both ``deform_groups`` and ``deformable_groups`` given.
    """

    @_accepts_deformable_groups("ModulatedDeformConv2d")
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: Union[bool, str] = True,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, deform_groups, bool(bias)
        )
        self.init_weights()

    def init_weights(self) -> None:
        """mmcv's initialisation: ``weight`` uniform in +-1 / sqrt(in_channels * kH * kW), ``bias`` zero."""
        # uniform in +-1/sqrt(in_channels * kH * kW), bias zero: mmcv's initialisation
        stdv = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -stdv, stdv)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        """:func:`deform_conv2d` of ``x`` (Tensor[N, in_channels, H, W]) with ``offset``
        (Tensor[N, 2 * dg * kH * kW, H_out, W_out]), ``mask`` (Tensor[N, dg * kH * kW, H_out, W_out]) and
        the layer's weight, bias, stride, padding and dilation."""
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask)


class ModulatedDeformConv2dPack(_PackVersion, ModulatedDeformConv2d):
    """``ModulatedDeformConv2d`` that predicts its own offsets and mask: ``forward(x)``,
    x Tensor[N, in_channels, H, W].

    mmcv 2.x's ``mmcv.ops.ModulatedDeformConv2dPack``, which mmcv registers as ``DCNv2``. In mmdcnv2's
    registry (where mmdet is installed) ``type='mmdcnv2.DCNv2'`` builds the subclass
    :class:`mmdcnv2.models.DCNv2` and ``type='mmdcnv2.ModulatedDeformConv2dPack'`` this class. The
    arguments are ``ModulatedDeformConv2d``'s.
    ``conv_offset`` is an ``nn.Conv2d(in_channels, 3 * deform_groups * kH * kW)`` with the layer's
    kernel size, stride, padding and dilation and a bias, zero-initialised (by ``init_weights()`` too).
    Its output splits into three equal chunks o1, o2, m: offset = cat(o1, o2), mask = sigmoid(m)
    (mmcv's layout, :meth:`split_offset_mask`). A new layer samples the regular grid with mask 0.5
    everywhere, i.e. computes half the plain convolution of its ``weight`` (plus bias).

    State dict: ``weight``, ``bias`` (with ``bias``), ``conv_offset.weight``, ``conv_offset.bias``
    (mmcv's keys, version 2). The keys of mmcv < 2 checkpoints (mmdet 1.x), ``<name>_offset.*`` beside
    the layer, are renamed to ``<name>.conv_offset.*`` on load, by a pre-hook of the parent module.

    On the CPU a plain NCHW ``x`` is copied once to channels-last for ``conv_offset`` and the op, and
    the output is handed back plain contiguous: the caller's memory format.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conv_offset = self._make_conv_offset(3)

    def init_weights(self) -> None:
        """``ModulatedDeformConv2d.init_weights``, and ``conv_offset`` zeroed (mmcv's)."""
        super().init_weights()
        if hasattr(self, "conv_offset"):
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)

    @staticmethod
    def split_offset_mask(raw: Tensor) -> Tuple[Tensor, Tensor]:
        """``conv_offset``'s output -> (offset, mask): three equal chunks o1, o2, m;
        offset = cat(o1, o2), mask = sigmoid(m) (mmcv's layout)."""
        o1, o2, m = torch.chunk(raw, 3, dim=1)
        return torch.cat((o1, o2), dim=1), torch.sigmoid(m)

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Offsets and mask from ``conv_offset(x)`` (:meth:`split_offset_mask`), then :func:`deform_conv2d`:
        Tensor[N, in_channels, H, W] -> Tensor[N, out_channels, H_out, W_out], in x's memory format."""
        xs, converted = _sampling_layout(x)
        offset, mask = self.split_offset_mask(self.conv_offset(xs))
        out = super().forward(xs, offset, mask)
        return out.contiguous() if converted else out  # the caller's layout
