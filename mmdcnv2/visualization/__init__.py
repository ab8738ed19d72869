"""What the deformable layers learned: effective sampling locations, receptive fields, RoI bins."""
from .sampling import (DCNRecorder, LayerGeometry, effective_receptive_field, effective_sampling_points,
                       roi_bin_centres)

__all__ = ["DCNRecorder", "LayerGeometry", "effective_sampling_points", "effective_receptive_field",
           "roi_bin_centres"]
