# DCNv1 on the embedded dataset: deformable conv (no modulation) in c3-c5 and deformable RoI
# pooling (no modulation); otherwise the main job's detector.
_base_ = "./faster-rcnn_r18-dcnv2-mdpool_fpn_shapes.py"
model = dict(
    backbone=dict(stage_dcn=(None, "DCN", "DCN", "DCN")),
    roi_head=dict(bbox_roi_extractor=dict(roi_layer=dict(type="mmdcnv2.DeformRoIPoolPack"))),
)
