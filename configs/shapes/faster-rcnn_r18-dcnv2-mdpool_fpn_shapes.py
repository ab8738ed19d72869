# The main job's detector: ResNet-18 (half width) with DCNv2 in c3-c5 and modulated
# deformable RoI pooling, on the embedded shapes dataset, from the pretrained backbone (_base_shapes.py).
_base_ = "./_base_shapes.py"
model = dict(
    backbone=dict(stage_dcn=(None, "DCNv2", "DCNv2", "DCNv2")),
    roi_head=dict(
        bbox_roi_extractor=dict(
            type="mmdcnv2.DeformRoIExtractor",
            roi_layer=dict(
                _delete_=True,
                type="mmdcnv2.ModulatedDeformRoIPoolPack",
                output_size=7,
                output_channels=64,
                deform_fc_channels=256,
            ),
        )
    ),
)
