# Mask R-CNN R-50-FPN, DCNv2 in c3-c5, mixed precision (AmpOptimWrapper), on mmdcnv2's ops.
_base_ = "mmdet::dcnv2/mask-rcnn_r50-mdconv-c3-c5_fpn_amp-1x_coco.py"
custom_imports = dict(imports=["mmdcnv2"], allow_failed_imports=False)
model = dict(backbone=dict(dcn=dict(type="mmdcnv2.DCNv2")))
