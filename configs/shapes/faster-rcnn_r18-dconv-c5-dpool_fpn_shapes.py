# DCNv1 as in its paper (the first row of DCNv2's ablation): deformable convolution in c5
# only, and deformable RoI pooling, both without modulation.
_base_ = "./faster-rcnn_r18-dcnv1-dpool_fpn_shapes.py"
model = dict(backbone=dict(stage_dcn=(None, None, None, "DCN")))
