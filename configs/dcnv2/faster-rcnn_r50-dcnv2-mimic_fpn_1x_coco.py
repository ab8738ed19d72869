# The full DCNv2 detector with R-CNN feature mimicking (paper section 3.3): DCNv2 in c3-c5,
# modulated deformable RoI pooling, and during training up to 32 positive RoIs per image
# cropped, resized to 224x224 and mimicked (cosine loss and R-CNN classifier, weight 0.1).
# The trained checkpoint loads into ./faster-rcnn_r50-dcnv2_fpn_1x_coco.py (the branch's
# classifier, mimic.fc_cls.*, is the only extra key) and predicts exactly as it does.
_base_ = "./faster-rcnn_r50-dcnv2_fpn_1x_coco.py"
model = dict(
    type="mmdcnv2.MimicRCNN",
    mimic=dict(
        type="mmdcnv2.RCNNMimicBranch",
        num_rois=32,
        crop_size=224,
        loss_mimic=dict(type="mmdcnv2.CosineMimicLoss", loss_weight=0.1, reduction="mean"),
        loss_cls=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.1),
    ),
)
custom_hooks = [dict(type="mmdcnv2.MimicHook")]
