# Faster R-CNN R-50-FPN, deformable conv (DCNv1) in c3-c5, on mmdcnv2's ops.
_base_ = "mmdet::dcn/faster-rcnn_r50-dconv-c3-c5_fpn_1x_coco.py"
custom_imports = dict(imports=["mmdcnv2"], allow_failed_imports=False)
model = dict(backbone=dict(dcn=dict(type="mmdcnv2.DCN")))
