# The embedded synthetic dataset (tools/make_shapes.py) and a schedule that trains on a CPU in minutes.
_base_ = "mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py"
custom_imports = dict(imports=["mmdcnv2"], allow_failed_imports=False)

data_root = "data/shapes/"
metainfo = dict(
    classes=("triangle", "star", "cross", "arrow", "crescent"),
    palette=[(220, 20, 60), (0, 130, 230), (250, 170, 30), (0, 160, 80), (150, 60, 200)],
)
backend_args = None
train_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="Resize", scale=(192, 192), keep_ratio=True),
    dict(type="RandomFlip", prob=0.5),
    dict(type="PackDetInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile", backend_args=backend_args),
    dict(type="Resize", scale=(192, 192), keep_ratio=True),
    dict(type="LoadAnnotations", with_bbox=True),
    dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
]
train_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    batch_sampler=None,
    dataset=dict(
        type="CocoDataset",
        data_root=data_root,
        metainfo=metainfo,
        ann_file="annotations/train.json",
        data_prefix=dict(img=""),
        filter_cfg=dict(filter_empty_gt=True, min_size=4),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=4,
    num_workers=1,
    persistent_workers=True,
    dataset=dict(
        type="CocoDataset",
        data_root=data_root,
        metainfo=metainfo,
        ann_file="annotations/val.json",
        data_prefix=dict(img=""),
        test_mode=True,
        pipeline=test_pipeline,
    ),
)
test_dataloader = val_dataloader
val_evaluator = dict(type="CocoMetric", ann_file=data_root + "annotations/val.json", metric="bbox", format_only=False)
test_evaluator = val_evaluator

# A small detector: ResNet-18 at half width, starting from the crop classifier that
# tools/pretrain_backbone.py trained on the generator's own crops (the role ImageNet plays in
# mmdet's configs; the checkpoint ships in the repository and in the wheel, nothing is
# downloaded). As with mmdet's ImageNet backbones: stem and first stage frozen, batch norm
# frozen. A DCN layer loads the plain 3x3 conv's weight (its offsets start at zero).
pretrained = "{{ fileDirname }}/../../checkpoints/resnet18-half_shapes-pretrained.pth"
model = dict(
    backbone=dict(
        _delete_=True,
        type="mmdcnv2.DCNResNet",
        depth=18,
        base_channels=32,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=1,
        norm_cfg=dict(type="BN", requires_grad=False),
        norm_eval=True,
        style="pytorch",
        stage_dcn=(None, None, None, None),
        init_cfg=dict(type="Pretrained", checkpoint=pretrained),
    ),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=64),
    rpn_head=dict(in_channels=64, feat_channels=64),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=64),
        bbox_head=dict(in_channels=64, fc_out_channels=256, num_classes=5),
    ),
    train_cfg=dict(rpn=dict(sampler=dict(num=128)), rcnn=dict(sampler=dict(num=128))),
    test_cfg=dict(rcnn=dict(score_thr=0.05, max_per_img=50)),
)

max_iters = 600
train_cfg = dict(_delete_=True, type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
optim_wrapper = dict(
    _delete_=True,
    type="OptimWrapper",
    optimizer=dict(type="AdamW", lr=5e-4, weight_decay=1e-4),
    clip_grad=dict(max_norm=10.0, norm_type=2),
    # the paper's 0.1x learning rate for the layers that predict offsets and modulation
    # (deformable conv and RoI pooling); a no-op for the regular-convolution detector
    paramwise_cfg=dict(custom_keys={k: dict(lr_mult=0.1) for k in ("conv_offset", "offset_fc", "mask_fc")}),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(type="MultiStepLR", by_epoch=False, begin=0, end=max_iters, milestones=[int(max_iters * 0.8)], gamma=0.1),
]
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=25),
    checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=max_iters, max_keep_ckpts=2),
)
# offsets and modulation of the deformable layers in the log, per stage, on the logger's iterations
# (deform/<stage>/offset_abs_mean, outside_ratio, mask_mean, mask_std), and a warning naming a layer
# whose offsets run away or turn NaN (docs/deform_stats_hook.md); logs nothing for the plain detector.
# Its interval is the logger's.
custom_hooks = [dict(type="mmdcnv2.DeformStatsHook", interval=25)]
log_processor = dict(by_epoch=False)
randomness = dict(seed=0)
auto_scale_lr = dict(enable=False, base_batch_size=4)
