# Faster R-CNN R-50-FPN with deformable RoI pooling (DCNv1 head), on mmdcnv2's ops (runs on the CPU too).
_base_ = "mmdet::dcn/faster-rcnn_r50_fpn_dpool_1x_coco.py"
custom_imports = dict(imports=["mmdcnv2"], allow_failed_imports=False)
model = dict(
    roi_head=dict(
        bbox_roi_extractor=dict(type="mmdcnv2.DeformRoIExtractor", roi_layer=dict(type="mmdcnv2.DeformRoIPoolPack"))
    )
)
