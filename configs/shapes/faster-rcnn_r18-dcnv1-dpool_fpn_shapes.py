# DCNv1 on the embedded dataset: deformable conv (no modulation) in c3-c5 and deformable RoI pooling.
_base_ = "./_base_shapes.py"
model = dict(
    backbone=dict(stage_dcn=(None, "DCN", "DCN", "DCN")),
    roi_head=dict(
        bbox_roi_extractor=dict(
            type="mmdcnv2.DeformRoIExtractor",
            roi_layer=dict(
                _delete_=True,
                type="mmdcnv2.DeformRoIPoolPack",
                output_size=7,
                output_channels=64,
                deform_fc_channels=256,
            ),
        )
    ),
)
