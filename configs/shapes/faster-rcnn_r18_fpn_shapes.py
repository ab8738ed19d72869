# Baseline for comparisons on the embedded dataset: the main job's detector with regular
# convolutions and RoIAlign (no deformable layer), same schedule and seed.
_base_ = "./_base_shapes.py"
