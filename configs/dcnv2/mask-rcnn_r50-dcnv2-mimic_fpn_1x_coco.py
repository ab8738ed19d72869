# Mask R-CNN with DCNv2 in c3-c5, modulated deformable RoI pooling for the boxes, and R-CNN
# feature mimicking during training (the paper's defaults: 32 RoIs, 224x224 crops, weights 0.1).
_base_ = "./mask-rcnn_r50-mdconv-c3-c5-mdpool_fpn_1x_coco.py"
model = dict(type="mmdcnv2.MimicRCNN", mimic=dict(type="mmdcnv2.RCNNMimicBranch", num_rois=32, crop_size=224))
custom_hooks = [dict(type="mmdcnv2.MimicHook")]
