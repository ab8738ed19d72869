# Ablation step: modulated deformable convolution in c3-c5, deformable RoI pooling without
# modulation.
_base_ = "./faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py"
model = dict(roi_head=dict(bbox_roi_extractor=dict(roi_layer=dict(type="mmdcnv2.DeformRoIPoolPack"))))
