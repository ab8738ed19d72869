# Mask R-CNN R-50-FPN with DCNv2 in c3-c5 and modulated deformable RoI pooling in the box head.
_base_ = "./mask-rcnn_r50-mdconv-c3-c5_fpn_1x_coco.py"
model = dict(
    roi_head=dict(
        bbox_roi_extractor=dict(
            type="mmdcnv2.DeformRoIExtractor",
            roi_layer=dict(
                _delete_=True, type="mmdcnv2.ModulatedDeformRoIPoolPack", output_size=7, output_channels=256
            ),
        )
    )
)
