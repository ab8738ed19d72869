# Faster R-CNN R-50-FPN with modulated deformable RoI pooling, on mmdcnv2's ops (runs on the CPU too).
_base_ = "mmdet::dcnv2/faster-rcnn_r50_fpn_mdpool_1x_coco.py"
custom_imports = dict(imports=["mmdcnv2"], allow_failed_imports=False)
model = dict(
    roi_head=dict(
        bbox_roi_extractor=dict(
            type="mmdcnv2.DeformRoIExtractor", roi_layer=dict(type="mmdcnv2.ModulatedDeformRoIPoolPack")
        )
    )
)
