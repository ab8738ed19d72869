"""The R-CNN branch of DCNv2's feature mimicking (section 3.3 of arXiv 1811.11168).

During training, up to ``num_rois`` positive RoIs per image are cropped from the input
image, resized to ``crop_size`` x ``crop_size`` and sent through the detector's own
backbone, neck, RoI extractor (over the whole crop) and shared fc layers: ``f_RCNN``.
The Faster R-CNN head's shared-fc feature of the same RoI is ``f_FRCNN``. The branch
returns the cosine mimic loss between the two, and the cross-entropy loss of its own
(C+1)-way classifier on ``f_RCNN``. Its only parameters are that classifier's; it is
never called at inference.
"""

from typing import List, Optional, Tuple

import torch
from mmdet.models.roi_heads.bbox_heads import ConvFCBBoxHead
from mmdet.structures.bbox import get_box_tensor
from mmengine.model import BaseModule
from mmengine.structures import InstanceData
from torch import Tensor, nn

from mmdcnv2.ops import deform_roi_pool
from mmdcnv2.registry import MODELS

from .loss import cosine_similarity


def check_mimic_head(bbox_head) -> None:
    """Mimicking needs shared fc layers in the box head (mmdet's Shared2FCBBoxHead & co)."""
    if not isinstance(bbox_head, ConvFCBBoxHead) or bbox_head.num_shared_fcs < 1:
        raise TypeError(
            "feature mimicking needs a box head with shared fc layers (ConvFCBBoxHead with "
            f"num_shared_fcs >= 1, e.g. Shared2FCBBoxHead); got {type(bbox_head).__name__}"
        )


def shared_fc_features(bbox_head: ConvFCBBoxHead, roi_feats: Tensor) -> Tensor:
    """The feature that the classifier and regressor of a ConvFCBBoxHead share (fc2 after ReLU).

    The same modules, in the same order, as the shared part of ``ConvFCBBoxHead.forward``.
    """
    x = roi_feats
    for conv in bbox_head.shared_convs:
        x = conv(x)
    if bbox_head.with_avg_pool:
        x = bbox_head.avg_pool(x)
    x = x.flatten(1)
    for fc in bbox_head.shared_fcs:
        x = bbox_head.relu(fc(x))
    return x


def roi_head_features(roi_head, feats: Tuple[Tensor, ...], rois: Tensor) -> Tensor:
    """RoI features of ``rois`` through the head's extractor, shared head and shared fcs."""
    extractor = roi_head.bbox_roi_extractor
    roi_feats = extractor(feats[: extractor.num_inputs], rois)
    if roi_head.with_shared_head:
        roi_feats = roi_head.shared_head(roi_feats)
    return shared_fc_features(roi_head.bbox_head, roi_feats)


@MODELS.register_module()
class RCNNMimicBranch(BaseModule):
    """The R-CNN branch of feature mimicking: positive-RoI sampling, crops, its classifier and both losses.

    ``type='mmdcnv2.RCNNMimicBranch'``, built by :class:`MimicRCNN` from its ``mimic`` config
    (training only; never called at inference)::

        model = dict(type="mmdcnv2.MimicRCNN",
                     mimic=dict(type="mmdcnv2.RCNNMimicBranch", num_rois=32, crop_size=224))

    Args:
        num_classes (int): classes of the detector (the classifier has ``num_classes + 1``
            outputs, background last, as mmdet's heads). Filled in by ``MimicRCNN``.
        in_channels (int): width of the box head's shared fc feature. Filled in by ``MimicRCNN``.
        num_rois (int): positive RoIs mimicked per image at most (paper: 32), drawn at random
            among the proposals that the RoI head's assigner marks positive. Default: 32.
        crop_size (int): side of the square image crop of each RoI (paper: 224). Default: 224.
        add_gt_as_proposals (bool): the ground-truth boxes are candidates too (as in mmdet's
            RoI samplers), so that every image has positives even before the RPN learns. Default: True.
        loss_mimic (dict): the cosine mimic loss (paper: weight 0.1). Default:
            ``dict(type='mmdcnv2.CosineMimicLoss', loss_weight=0.1, reduction='mean')``.
        loss_cls (dict): the branch classifier's loss (paper: cross-entropy, weight 0.1). Default:
            ``dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.1)``.
        init_cfg (dict, optional): mmengine's initialisation; default: the classifier ``fc_cls``
            from a normal distribution with std 0.01 (bias zero, mmengine's ``Normal`` init).

    Its only parameters are ``fc_cls`` (``nn.Linear(in_channels, num_classes + 1)``; state-dict keys
    ``mimic.fc_cls.weight``, ``mimic.fc_cls.bias`` in the detector). ``loss_scale`` (a plain float,
    1.0; :class:`mmdcnv2.engine.MimicHook` schedules it) multiplies both losses; at 0 the branch does
    not run.

    Raises:
        ValueError: ``num_classes``, ``in_channels``, ``num_rois`` or ``crop_size`` not a positive int.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        num_rois: int = 32,
        crop_size: int = 224,
        add_gt_as_proposals: bool = True,
        loss_mimic: dict = dict(type="mmdcnv2.CosineMimicLoss", loss_weight=0.1, reduction="mean"),
        loss_cls: dict = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.1),
        init_cfg: Optional[dict] = dict(type="Normal", std=0.01, override=dict(name="fc_cls")),
    ):
        super().__init__(init_cfg=init_cfg)
        for name, value in (
            ("num_classes", num_classes),
            ("in_channels", in_channels),
            ("num_rois", num_rois),
            ("crop_size", crop_size),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_classes = num_classes
        self.num_rois = num_rois
        self.crop_size = crop_size
        self.add_gt_as_proposals = add_gt_as_proposals
        self.fc_cls = nn.Linear(in_channels, num_classes + 1)
        self.loss_mimic = MODELS.build(loss_mimic)
        self.loss_cls = MODELS.build(loss_cls)
        # Multiplies both losses; MimicHook schedules it (a plain float: nothing to
        # synchronise, not part of the state dict).
        self.loss_scale = 1.0

    @torch.no_grad()
    def sample_positives(self, proposals: List[InstanceData], batch_data_samples, assigner) -> Tuple[Tensor, Tensor]:
        """Up to ``num_rois`` positive RoIs per image: ``rois`` [K, 5] (image index, x1, y1,
        x2, y2) and the labels [K] of the ground truths they were assigned to."""
        rois, labels = [], []
        for i, (props, sample) in enumerate(zip(proposals, batch_data_samples)):
            boxes = props.bboxes if "bboxes" in props else props.priors
            boxes = get_box_tensor(boxes).detach()
            gt = sample.gt_instances
            if self.add_gt_as_proposals and len(gt) > 0:
                boxes = torch.cat([get_box_tensor(gt.bboxes).to(boxes), boxes])
            ignored = sample.get("ignored_instances", None)
            result = assigner.assign(InstanceData(priors=boxes), gt, ignored)
            pos = torch.nonzero(result.gt_inds > 0, as_tuple=False).squeeze(1)
            if pos.numel() > self.num_rois:
                pos = pos[torch.randperm(pos.numel(), device=pos.device)[: self.num_rois]]
            rois.append(torch.cat([boxes.new_full((pos.numel(), 1), i), boxes[pos]], dim=1))
            labels.append(result.labels[pos])
        return torch.cat(rois), torch.cat(labels).long()

    @torch.no_grad()
    def crop(self, images: Tensor, rois: Tensor) -> Tensor:
        """Bilinear crops of ``rois`` from ``images``, resized to crop_size x crop_size
        (pixel-centre aligned, one sample per output pixel)."""
        crops = deform_roi_pool(
            images.float(), rois.float(), None, output_size=self.crop_size, spatial_scale=1.0, sampling_ratio=1
        )
        return crops.to(images.dtype)

    def _zero_losses(self) -> dict:
        # keeps the classifier in the graph when nothing is mimicked (DDP expects every
        # parameter to receive a gradient)
        zero = sum(p.sum() for p in self.fc_cls.parameters()) * 0.0
        return dict(loss_mimic=zero, loss_mimic_cls=zero)

    def loss(
        self, detector, images: Tensor, feats: Tuple[Tensor, ...], proposals: List[InstanceData], batch_data_samples
    ) -> dict:
        """The branch's losses (``loss_mimic``, ``loss_mimic_cls``) and logs (``mimic_cos``:
        mean cosine similarity of the mimicked pairs; ``mimic_acc``: the branch
        classifier's accuracy in %; ``mimic_rois``: RoIs mimicked in the batch)."""
        if self.loss_scale == 0:
            return self._zero_losses()
        roi_head = detector.roi_head
        rois, labels = self.sample_positives(proposals, batch_data_samples, roi_head.bbox_assigner)
        if rois.shape[0] == 0:
            return self._zero_losses()
        f_frcnn = roi_head_features(roi_head, feats, rois)
        crops = self.crop(images, rois)
        crop_rois = torch.zeros(rois.shape[0], 5, dtype=rois.dtype, device=rois.device)
        crop_rois[:, 0] = torch.arange(rois.shape[0], device=rois.device, dtype=rois.dtype)
        crop_rois[:, 3:] = float(self.crop_size)
        f_rcnn = roi_head_features(roi_head, detector.extract_feat(crops), crop_rois)
        cls_score = self.fc_cls(f_rcnn)
        losses = dict(
            loss_mimic=self.loss_scale * self.loss_mimic(f_rcnn, f_frcnn),
            loss_mimic_cls=self.loss_scale * self.loss_cls(cls_score, labels),
        )
        losses["mimic_cos"] = cosine_similarity(f_rcnn, f_frcnn)
        losses["mimic_acc"] = (cls_score.detach().argmax(1) == labels).float().mean() * 100
        losses["mimic_rois"] = torch.tensor(float(rois.shape[0]), device=rois.device)
        return losses

    def extra_repr(self) -> str:
        return f"num_rois={self.num_rois}, crop_size={self.crop_size}, add_gt_as_proposals={self.add_gt_as_proposals}"
