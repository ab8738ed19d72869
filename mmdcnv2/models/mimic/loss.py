"""The cosine feature-mimicking loss of DCNv2 (section 3.3 of arXiv 1811.11168)."""

from typing import Optional

import torch
from torch import Tensor, nn

from mmdcnv2.registry import MODELS


def cosine_mimic_loss(pred: Tensor, target: Tensor, reduction: str = "mean", eps: float = 1e-8) -> Tensor:
    """``1 - cos(pred[i], target[i])`` per row, reduced by ``reduction`` ('mean', 'sum', 'none').

    Computed in float32 whatever the inputs' dtype (the norms of 1024-d fc features
    overflow float16). Gradients flow into both arguments: neither side is a fixed
    teacher. A zero row has cosine 0 (loss 1) and no gradient through its direction.
    """
    if pred.shape != target.shape or pred.dim() != 2:
        raise ValueError(
            f"pred and target must both be [N, D] with the same shape, got {tuple(pred.shape)} "
            f"and {tuple(target.shape)}"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    p, t = pred.float(), target.float()
    cos = (p * t).sum(1) / (p.norm(dim=1) * t.norm(dim=1)).clamp_min(eps)
    loss = 1.0 - cos
    if reduction == "none":
        return loss
    if loss.numel() == 0:  # no RoI: a zero that still depends on both inputs
        return (pred.sum() + target.sum()).float() * 0.0
    return loss.sum() if reduction == "sum" else loss.mean()


@MODELS.register_module()
class CosineMimicLoss(nn.Module):
    """``loss_weight * reduce_i (1 - cos(f_RCNN_i, f_FRCNN_i))`` over the mimicked RoIs.

    The paper writes the loss as a sum over the sampled RoIs; the default here is the
    mean, like every other loss of mmdet's R-CNN heads, so that its size does not grow
    with the batch or the number of RoIs. ``reduction='sum'`` gives the paper's form.

    ``type='mmdcnv2.CosineMimicLoss'``, the default ``loss_mimic`` of ``mmdcnv2.RCNNMimicBranch``.
    Computed in float32 whatever the inputs' dtype, with gradients into both arguments
    (:func:`cosine_mimic_loss`); no parameters.

    Args:
        loss_weight (float): multiplies the loss (paper: 0.1). Default: 0.1.
        reduction (str): ``'mean'`` (default) or ``'sum'`` over the RoIs.

    ``forward(pred, target, reduction_override=None)``: ``pred``, ``target`` Tensor[N, D] ->
    a float32 scalar (Tensor[N] with ``reduction_override='none'``).

    Raises:
        ValueError: another ``reduction``; in ``forward``, inputs that are not both [N, D] of one shape.
    """

    def __init__(self, loss_weight: float = 0.1, reduction: str = "mean"):
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.loss_weight = float(loss_weight)
        self.reduction = reduction

    def forward(self, pred: Tensor, target: Tensor, reduction_override: Optional[str] = None) -> Tensor:
        return self.loss_weight * cosine_mimic_loss(pred, target, reduction_override or self.reduction)

    def extra_repr(self) -> str:
        return f"loss_weight={self.loss_weight}, reduction={self.reduction!r}"


def cosine_similarity(pred: Tensor, target: Tensor) -> Tensor:
    """Mean cosine similarity of the rows (a detached float32 scalar for logs; 0 when empty)."""
    with torch.no_grad():
        if pred.numel() == 0:
            return pred.new_zeros((), dtype=torch.float32)
        return 1.0 - cosine_mimic_loss(pred, target, "mean")
