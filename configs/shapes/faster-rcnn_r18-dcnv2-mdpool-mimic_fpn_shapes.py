# The main job's detector (DCNv2 in c3-c5, modulated deformable RoI pooling) trained with
# R-CNN feature mimicking. Scaled to the embedded dataset and a CPU: 8 positive RoIs per
# image and 64x64 crops (the paper's 32 and 224 would cost ~40 extra backbone passes).
_base_ = "./faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py"
model = dict(type="mmdcnv2.MimicRCNN", mimic=dict(type="mmdcnv2.RCNNMimicBranch", num_rois=8, crop_size=64))
custom_hooks = [dict(type="mmdcnv2.DeformStatsHook", interval=25), dict(type="mmdcnv2.MimicHook")]
