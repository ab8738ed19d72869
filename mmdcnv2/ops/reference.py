"""Slow, obviously correct pure-PyTorch implementations of the ops.

They follow the definitions directly (gather the four corners, weight them,
sum), differentiate through plain autograd, and serve as the oracle of the
tests. They also run wherever the compiled extension is not built.
"""

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

IntPair = Union[int, Tuple[int, int]]

#: Samples per RoI bin along each axis, at most (csrc/common/bilinear.h, kMaxRoISamples): the
#: adaptive grid (sampling_ratio=0) is capped there and larger explicit ratios are refused.
MAX_ROI_SAMPLES = 64


def _pair(v: IntPair) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def bilinear_gather(x: Tensor, y: Tensor, xq: Tensor) -> Tensor:
    """Bilinear samples of ``x`` with zero outside the map.

    Args:
        x: Tensor[N, G, C, H, W], G sampling groups of C channels each.
        y, xq: Tensor[N, G, *S], fractional row and column of every sample.

    Returns:
        Tensor[N, G, C, *S]. A sample counts only where -1 < y < H and -1 < x < W
        (non-finite positions give 0); corners off the map read 0.
    """
    N, G, C, H, W = x.shape
    S = y.shape[2:]
    inside = (y > -1) & (y < H) & (xq > -1) & (xq < W)
    y = torch.where(inside, y, torch.zeros_like(y))
    xq = torch.where(inside, xq, torch.zeros_like(xq))
    y0 = torch.floor(y)
    x0 = torch.floor(xq)
    ly, lx = y - y0, xq - x0
    flat = x.reshape(N, G, C, H * W)
    out = 0
    for dy, dx, wgt in ((0, 0, (1 - ly) * (1 - lx)), (0, 1, (1 - ly) * lx), (1, 0, ly * (1 - lx)), (1, 1, ly * lx)):
        yy, xx = y0 + dy, x0 + dx
        valid = inside & (yy >= 0) & (yy <= H - 1) & (xx >= 0) & (xx <= W - 1)
        idx = (yy.clamp(0, H - 1) * W + xx.clamp(0, W - 1)).long().reshape(N, G, 1, -1).expand(N, G, C, -1)
        vals = flat.gather(3, idx).reshape(N, G, C, *S)
        out = out + vals * torch.where(valid, wgt, torch.zeros_like(wgt)).unsqueeze(2)
    return out


def deform_conv2d_reference(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """Deformable convolution in plain PyTorch (v1 without ``mask``, v2 with it): the oracle of the tests.

    Same arguments, shapes and result as :func:`mmdcnv2.ops.deform_conv2d`:
    groups = C_in // weight.shape[1], deform groups dg = offset.shape[1] // (2 * kH * kW).

    Args:
        input (Tensor[N, C_in, H, W]): input features.
        offset (Tensor[N, 2 * dg * kH * kW, H_out, W_out]): (dy, dx) per deform group and kernel tap.
        weight (Tensor[C_out, C_in / groups, kH, kW]): convolution weight.
        bias (Tensor[C_out], optional): added to every output position.
        stride, padding, dilation (int or (int, int)): as in ``torch.nn.functional.conv2d``.
        mask (Tensor[N, dg * kH * kW, H_out, W_out], optional): modulation of every sample; a sample
            off the map is zero whatever its mask (NaN and inf included), as in the kernels.

    Returns:
        Tensor[N, C_out, H_out, W_out] on the input's device, computed in the arguments' dtype (float16
        and bfloat16 do not accumulate in float32 here).

    It needs no compiled extension and runs on any device and floating dtype; gradients come from
    plain autograd. It has no autocast registration: under ``torch.autocast`` its operations
    follow autocast's usual rules. The arguments are not checked as :func:`mmdcnv2.ops.deform_conv2d`
    checks them: malformed ones fail inside PyTorch's own operations, with their messages.
    """
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    N, C, H, W = input.shape
    Cout, Cg, kh, kw = weight.shape
    K = kh * kw
    groups = C // Cg
    dg = offset.shape[1] // (2 * K)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    dev, dt = input.device, input.dtype
    off = offset.reshape(N, dg, K, 2, Ho, Wo)
    ky = (torch.arange(kh, device=dev, dtype=dt) * dh).repeat_interleave(kw).view(1, 1, K, 1, 1)
    kx = (torch.arange(kw, device=dev, dtype=dt) * dw).repeat(kh).view(1, 1, K, 1, 1)
    oy = (torch.arange(Ho, device=dev, dtype=dt) * sh - ph).view(1, 1, 1, Ho, 1)
    ox = (torch.arange(Wo, device=dev, dtype=dt) * sw - pw).view(1, 1, 1, 1, Wo)
    y = oy + ky + off[:, :, :, 0]
    x = ox + kx + off[:, :, :, 1]
    vals = bilinear_gather(input.reshape(N, dg, C // dg, H, W), y, x)  # [N, dg, C/dg, K, Ho, Wo]
    if mask is not None:
        # a sample off the map is zero whatever its mask (NaN and inf included), as in the kernels
        inside = (y > -1) & (y < H) & (x > -1) & (x < W)
        m = torch.where(inside, mask.reshape(N, dg, K, Ho, Wo), torch.zeros((), dtype=mask.dtype, device=dev))
        vals = vals * m.unsqueeze(2)
    cols = vals.reshape(N, groups, Cg * K, Ho * Wo)
    out = torch.einsum("gok,ngkp->ngop", weight.reshape(groups, Cout // groups, Cg * K), cols)
    out = out.reshape(N, Cout, Ho, Wo)
    if bias is not None:
        out = out + bias.view(1, Cout, 1, 1)
    return out


def clamped_gather(x: Tensor, y: Tensor, xq: Tensor) -> Tensor:
    """RoIAlign's bilinear samples of ``x`` (Tensor[C, H, W]) at ``y``, ``xq`` (same shape S).

    Returns Tensor[C, *S]. A sample counts where -1 <= y <= H and -1 <= x <= W;
    coordinates in [-1, 0] and [size - 1, size] are clamped to the border. Any other
    position (non-finite ones included) gives 0 and has zero gradient.
    """
    C, H, W = x.shape
    inside = (y >= -1) & (y <= H) & (xq >= -1) & (xq <= W)
    zero = torch.zeros_like(y)
    # positions that do not count (non-finite ones included) read from 0, with zero weight below
    y, xq = torch.where(inside, y, zero), torch.where(inside, xq, zero)

    def axis(v, size):
        v = torch.where(v <= 0, zero, v)
        lo = torch.floor(v).detach()
        edge = lo >= size - 1
        v = torch.where(edge, torch.full_like(v, size - 1), v)
        lo = torch.where(edge, torch.full_like(lo, size - 1), lo)
        hi = torch.where(edge, lo, lo + 1)
        return v - lo, lo.long(), hi.long()

    ly, y0, y1 = axis(y, H)
    lx, x0, x1 = axis(xq, W)
    flat = x.reshape(C, H * W)
    out = 0
    for yy, xx, wgt in (
        (y0, x0, (1 - ly) * (1 - lx)),
        (y0, x1, (1 - ly) * lx),
        (y1, x0, ly * (1 - lx)),
        (y1, x1, ly * lx),
    ):
        vals = flat[:, (yy * W + xx).reshape(-1)].reshape(C, *y.shape)
        out = out + vals * torch.where(inside, wgt, zero)
    return out


def deform_roi_pool_reference(
    input: Tensor,
    rois: Tensor,
    offset: Optional[Tensor] = None,
    output_size: IntPair = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
) -> Tensor:
    """Deformable RoI pooling in plain PyTorch, one RoI at a time: the oracle of the tests.

    Same arguments, shapes and result as :func:`mmdcnv2.ops.deform_roi_pool`.

    Args:
        input (Tensor[N, C, H, W]): feature map.
        rois (Tensor[K, 5]): (batch_index, x1, y1, x2, y2) in image coordinates.
        offset (Tensor[K, 2, PH, PW], optional): per-bin offsets (x, y), in units of the RoI's size.
        output_size (int or (int, int)): (PH, PW).
        spatial_scale (float): feature-map size over image size.
        sampling_ratio (int): samples per bin along each axis; 0: ceil(bin size), capped at
            ``MAX_ROI_SAMPLES`` (64) as in the kernels. An explicit ratio is used as given (the op
            refuses one above 64).
        gamma (float): scale of the offsets.

    Returns:
        Tensor[K, C, PH, PW] on the input's device, computed in the input's dtype; a RoI with a
        non-finite coordinate, or an empty sampling grid, gives zeros.

    It needs no compiled extension; gradients come from plain autograd. The arguments are not
    checked: it reads the batch index with ``int(rois[k, 0])`` and indexes ``input`` with it, so an
    out-of-range index fails with PyTorch's ``IndexError`` (a negative one indexes from the end), a
    NaN one with ``ValueError``; call :func:`mmdcnv2.ops.deform_roi_pool` for the argument checks.
    It synchronises with the device for every RoI (``int()``, ``bool()``): slow on CUDA.
    """
    PH, PW = _pair(output_size)
    C = input.shape[1]
    dt, dev = input.dtype, input.device
    outs = []
    for k in range(rois.shape[0]):
        b = int(rois[k, 0])
        x1, y1, x2, y2 = (rois[k, i].to(dt) for i in range(1, 5))
        sx, sy = x1 * spatial_scale - 0.5, y1 * spatial_scale - 0.5
        roi_w, roi_h = x2 * spatial_scale - 0.5 - sx, y2 * spatial_scale - 0.5 - sy
        if not all(bool(torch.isfinite(v)) for v in (sx, sy, roi_w, roi_h)):
            outs.append(input.new_zeros(C, PH, PW))  # a non-finite RoI has no samples
            continue
        bin_h, bin_w = roi_h / PH, roi_w / PW
        # the adaptive grid is capped at MAX_ROI_SAMPLES per axis, as in the kernels
        gh = sampling_ratio if sampling_ratio > 0 else max(int(torch.ceil(bin_h.clamp(max=MAX_ROI_SAMPLES))), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(int(torch.ceil(bin_w.clamp(max=MAX_ROI_SAMPLES))), 0)
        if gh == 0 or gw == 0:
            outs.append(input.new_zeros(C, PH, PW))
            continue
        dx = offset[k, 0] if offset is not None else 0
        dy = offset[k, 1] if offset is not None else 0
        y0 = sy + gamma * roi_h * dy + torch.arange(PH, device=dev, dtype=dt).view(PH, 1) * bin_h
        x0 = sx + gamma * roi_w * dx + torch.arange(PW, device=dev, dtype=dt).view(1, PW) * bin_w
        y0, x0 = torch.broadcast_tensors(y0, x0)
        fy = (torch.arange(gh, device=dev, dtype=dt) + 0.5) * (bin_h / gh)
        fx = (torch.arange(gw, device=dev, dtype=dt) + 0.5) * (bin_w / gw)
        ys = (y0[..., None, None] + fy.view(gh, 1)).expand(PH, PW, gh, gw)
        xs = (x0[..., None, None] + fx.view(1, gw)).expand(PH, PW, gh, gw)
        vals = clamped_gather(input[b], ys, xs)  # [C, PH, PW, gh, gw]
        outs.append(vals.sum((-1, -2)) / (gh * gw))
    if not outs:
        return input.new_zeros(0, C, PH, PW)
    return torch.stack(outs)
