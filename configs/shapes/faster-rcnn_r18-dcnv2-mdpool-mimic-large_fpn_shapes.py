# R-CNN feature mimicking closer to the paper's setting (32 positive RoIs per image, 224x224
# crops), as far as a 2-core CPU allows: 16 RoIs per image and 80x80 crops (the crops' backbone
# pass costs about 3x the detection images' own). Otherwise the mimicking row of the ablation.
_base_ = "./faster-rcnn_r18-dcnv2-mdpool-mimic_fpn_shapes.py"
model = dict(mimic=dict(num_rois=16, crop_size=80))
