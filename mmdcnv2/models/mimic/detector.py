"""A two-stage detector (Faster or Mask R-CNN) that trains with DCNv2's feature mimicking."""

import copy
from typing import Optional

import torch
from mmdet.models.detectors import TwoStageDetector
from torch import Tensor

from mmdcnv2.registry import MODELS

from .branch import check_mimic_head


@MODELS.register_module()
class MimicRCNN(TwoStageDetector):
    """mmdet's two-stage detector plus the R-CNN feature-mimicking branch (training only).

    Turn it on in a Faster R-CNN or Mask R-CNN config with::

        model = dict(type='mmdcnv2.MimicRCNN', mimic=dict(type='mmdcnv2.RCNNMimicBranch'))
        custom_hooks = [dict(type='mmdcnv2.MimicHook')]   # optional: schedule, logs

    ``mimic`` is the branch's config (``num_rois``, ``crop_size``, ``loss_mimic``,
    ``loss_cls``; ``num_classes`` and ``in_channels`` come from the box head). Prediction
    and the exported form are those of the plain detector: ``predict``/``_forward`` are
    inherited unchanged and never touch the branch. The branch's only parameters (its
    classifier, ``mimic.fc_cls.*``) are the keys a plain config reports as unexpected
    when it loads this detector's checkpoint.

    Args:
        mimic (dict, optional): the branch's config; ``type`` defaults to
            ``'mmdcnv2.RCNNMimicBranch'``, ``num_classes`` to the box head's ``num_classes`` and
            ``in_channels`` to its ``shared_out_channels``. Default: ``None``, the branch's defaults.
        *args, **kwargs: mmdet's ``TwoStageDetector`` arguments (``backbone``, ``neck``,
            ``rpn_head``, ``roi_head``, ``train_cfg``, ``test_cfg``, ``data_preprocessor``, ...).

    ``loss`` runs the backbone and neck once, the RPN as mmdet's two-stage detector does, then the
    branch's losses (``loss_mimic``, ``loss_mimic_cls``; logs ``mimic_cos``, ``mimic_acc``,
    ``mimic_rois``) and the RoI head's; the branch reruns the backbone, neck, RoI extractor and shared
    fcs on the RoI crops.

    Raises:
        ValueError: the model has no ``roi_head`` with a ``bbox_head``.
        TypeError: the box head has no shared fc layers (not a ``ConvFCBBoxHead`` with
            ``num_shared_fcs >= 1``, e.g. ``Shared2FCBBoxHead``).
    """

    def __init__(self, *args, mimic: Optional[dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.with_roi_head or not self.roi_head.with_bbox:
            raise ValueError("MimicRCNN needs a roi_head with a bbox_head")
        check_mimic_head(self.roi_head.bbox_head)
        cfg = copy.deepcopy(dict(mimic)) if mimic is not None else dict(type="mmdcnv2.RCNNMimicBranch")
        cfg.setdefault("type", "mmdcnv2.RCNNMimicBranch")
        cfg.setdefault("num_classes", self.roi_head.bbox_head.num_classes)
        cfg.setdefault("in_channels", self.roi_head.bbox_head.shared_out_channels)
        self.mimic = MODELS.build(cfg)

    def rpn_loss_and_proposals(self, x, batch_data_samples):
        """The RPN's losses (keys prefixed ``rpn_``) and proposals, as mmdet's two-stage loss has them."""
        if not self.with_rpn:
            return {}, [sample.proposals for sample in batch_data_samples]
        proposal_cfg = self.train_cfg.get("rpn_proposal", self.test_cfg.rpn)
        rpn_samples = copy.deepcopy(batch_data_samples)
        for sample in rpn_samples:  # the RPN is class-agnostic
            sample.gt_instances.labels = torch.zeros_like(sample.gt_instances.labels)
        losses, proposals = self.rpn_head.loss_and_predict(x, rpn_samples, proposal_cfg=proposal_cfg)
        losses = {(k if "loss" not in k or "rpn" in k else f"rpn_{k}"): v for k, v in losses.items()}
        return losses, proposals

    def loss(self, batch_inputs: Tensor, batch_data_samples) -> dict:
        x = self.extract_feat(batch_inputs)
        losses, proposals = self.rpn_loss_and_proposals(x, batch_data_samples)
        # the branch first: the RoI head renames the proposals' boxes in place
        losses.update(self.mimic.loss(self, batch_inputs, x, proposals, batch_data_samples))
        losses.update(self.roi_head.loss(x, proposals, batch_data_samples))
        return losses
