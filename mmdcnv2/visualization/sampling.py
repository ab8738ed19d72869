"""Geometry of deformable layers, as in the DCNv2 paper's figures.

A unit at output position p of a deformable layer samples the layer's input at
p * stride - padding + k * dilation + offset_k(p) for each kernel tap k, each sample
weighted by its modulation m_k(p). Stacked deformable layers compose: each sampling
point of the upper layer is an output position of the layer below (through the 1x1
convs in between, which keep positions), where that layer's offsets and masks are
read by bilinear interpolation, so three stacked 3x3 layers give up to 9^3 = 729
points, each weighted by the product of the masks along its path.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mmdcnv2.ops import DeformConv2dPack, ModulatedDeformConv2dPack


@dataclass
class LayerGeometry:
    """One deformable layer of one image: offset Tensor[2K, Ho, Wo] (dy, dx per tap), mask
    Tensor[K, Ho, Wo] or None, and the conv's kernel size, stride, padding and dilation."""

    offset: Tensor
    mask: Optional[Tensor]
    kernel_size: Tuple[int, int]
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)


def _interp(field: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Bilinear values of field Tensor[C, H, W] at points y, x Tensor[M] (clamped to the map): Tensor[M, C]."""
    C, H, W = field.shape
    y = y.clamp(0, H - 1)
    x = x.clamp(0, W - 1)
    y0, x0 = y.floor().long(), x.floor().long()
    y1, x1 = (y0 + 1).clamp(max=H - 1), (x0 + 1).clamp(max=W - 1)
    ly, lx = (y - y0).unsqueeze(1), (x - x0).unsqueeze(1)
    f = field.permute(1, 2, 0)
    return f[y0, x0] * (1 - ly) * (1 - lx) + f[y0, x1] * (1 - ly) * lx + f[y1, x0] * ly * (1 - lx) + f[y1, x1] * ly * lx


@torch.no_grad()
def effective_sampling_points(layers: Sequence[LayerGeometry], position: Tuple[float, float]):
    """Sampling points of the unit at ``position`` (y, x) of the last layer's output,
    traced down through all ``layers`` (bottom first).

    Returns (points Tensor[M, 2] as (y, x) in the first layer's input grid,
    weights Tensor[M]: product of the modulation along each path, 1 without masks).
    """
    pts = torch.tensor([position], dtype=torch.float64)
    weights = torch.ones(1, dtype=torch.float64)
    for g in reversed(list(layers)):
        kh, kw = g.kernel_size
        K = kh * kw
        off = _interp(g.offset.double(), pts[:, 0], pts[:, 1]).view(-1, K, 2)  # [M, K, (dy, dx)]
        ky = torch.arange(kh, dtype=torch.float64).repeat_interleave(kw) * g.dilation[0]
        kx = torch.arange(kw, dtype=torch.float64).repeat(kh) * g.dilation[1]
        y = pts[:, :1] * g.stride[0] - g.padding[0] + ky + off[..., 0]
        x = pts[:, 1:] * g.stride[1] - g.padding[1] + kx + off[..., 1]
        if g.mask is not None:
            m = _interp(g.mask.double(), pts[:, 0], pts[:, 1])  # [M, K]
            weights = (weights.unsqueeze(1) * m).reshape(-1)
        else:
            weights = weights.repeat_interleave(K)
        pts = torch.stack([y.reshape(-1), x.reshape(-1)], dim=1)
    return pts, weights


class DCNRecorder:
    """Records, during a forward pass, the offsets and masks of every deformable conv layer
    of ``model`` (anything built on mmdcnv2's Pack modules)."""

    def __init__(self, model: nn.Module):
        self.convs: List[Tuple[str, nn.Module]] = [
            (n, m) for n, m in model.named_modules() if isinstance(m, (DeformConv2dPack, ModulatedDeformConv2dPack))
        ]
        self.records = {}
        self._handles = []
        for name, m in self.convs:
            self._handles.append(m.conv_offset.register_forward_hook(self._conv_hook(name, m)))

    def _conv_hook(self, name, module):
        def hook(_, inputs, out):
            out = out.detach()
            if isinstance(module, ModulatedDeformConv2dPack):
                self.records[name] = module.split_offset_mask(out)
            else:
                self.records[name] = (out, None)

        return hook

    def geometry(self, names: Sequence[str], image_index: int = 0) -> List[LayerGeometry]:
        """LayerGeometry of the named conv layers (bottom first) for one image of the batch."""
        mods = dict(self.convs)
        out = []
        for n in names:
            off, mask = self.records[n]
            m = mods[n]
            out.append(
                LayerGeometry(
                    off[image_index],
                    None if mask is None else mask[image_index],
                    m.kernel_size,
                    m.stride,
                    m.padding,
                    m.dilation,
                )
            )
        return out

    def remove(self):
        for h in self._handles:
            h.remove()


def roi_bin_centres(roi: Tensor, offset: Optional[Tensor], output_size: Tuple[int, int], gamma: float = 0.1):
    """Centres (in image coordinates) of the bins of one RoI (x1, y1, x2, y2) after their
    learned offsets (Tensor[2, PH, PW], x then y): Tensor[PH, PW, 2] as (x, y); also the
    undeformed centres."""
    PH, PW = output_size
    x1, y1, x2, y2 = [float(v) for v in roi]
    w, h = x2 - x1, y2 - y1
    cy = y1 + (torch.arange(PH, dtype=torch.float64) + 0.5) * h / PH
    cx = x1 + (torch.arange(PW, dtype=torch.float64) + 0.5) * w / PW
    base = torch.stack(torch.meshgrid(cx, cy, indexing="xy"), dim=-1)  # [PH, PW, 2] (x, y)
    if offset is None:
        return base, base
    shift = torch.stack([gamma * w * offset[0].double(), gamma * h * offset[1].double()], dim=-1)
    return base + shift, base


def effective_receptive_field(model_fn, image: Tensor, position: Tuple[int, int]) -> Tensor:
    """|d activation / d input pixel| of the unit at ``position`` of the feature map that
    ``model_fn(image)`` returns (Tensor[1, C, h, w]); summed over channels: Tensor[H, W]."""
    img = image.detach().clone().requires_grad_()
    feat = model_fn(img)
    feat[0, :, position[0], position[1]].sum().backward()
    return img.grad[0].abs().sum(0)
