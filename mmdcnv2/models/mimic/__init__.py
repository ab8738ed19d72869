"""R-CNN feature mimicking (DCNv2, section 3.3): the branch, its loss, the detector."""

from .branch import RCNNMimicBranch, roi_head_features, shared_fc_features
from .detector import MimicRCNN
from .loss import CosineMimicLoss, cosine_mimic_loss

__all__ = [
    "CosineMimicLoss",
    "MimicRCNN",
    "RCNNMimicBranch",
    "cosine_mimic_loss",
    "roi_head_features",
    "shared_fc_features",
]
