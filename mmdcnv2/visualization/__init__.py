"""What the deformable layers learned: effective sampling locations, receptive fields, RoI bins;
and ground truth beside detections."""

from .detections import draw_dataset_grid, draw_detection_grid
from .sampling import DCNRecorder, LayerGeometry, effective_receptive_field, effective_sampling_points, roi_bin_centres

__all__ = [
    "draw_dataset_grid",
    "draw_detection_grid",
    "DCNRecorder",
    "LayerGeometry",
    "effective_sampling_points",
    "effective_receptive_field",
    "roi_bin_centres",
]
