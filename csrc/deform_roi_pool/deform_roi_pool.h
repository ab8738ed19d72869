// Deformable RoI pooling: shape checks shared by the CPU and CUDA kernels.
//
// Output bin (ph, pw) of RoI k averages grid_h x grid_w bilinear samples (RoIAlign,
// aligned=True), the bin shifted by gamma * (roi_w * offset[k, 0, ph, pw],
// roi_h * offset[k, 1, ph, pw]). Both devices work on channels-last input, so the
// four corners of a sample are contiguous channel vectors.
#pragma once

#include <ATen/ATen.h>

#include "../common/compat.h"

namespace mmdcnv2 {

// The ops' schemas (see deform_conv.h).
inline constexpr const char* kDeformRoIPoolSchema =
    "deform_roi_pool(Tensor input, Tensor rois, Tensor? offset, int pooled_height, int pooled_width, "
    "float spatial_scale, int sampling_ratio, float gamma) -> Tensor";
inline constexpr const char* kDeformRoIPoolBackwardSchema =
    "deform_roi_pool_backward(Tensor grad_output, Tensor input, Tensor rois, Tensor? offset, int pooled_height, "
    "int pooled_width, float spatial_scale, int sampling_ratio, float gamma) -> (Tensor grad_input, Tensor "
    "grad_offset)";

struct RoIPoolGeom {
  int64_t N, C, H, W;  // input
  int64_t R;           // number of RoIs
  int64_t PH, PW;      // output size
  double spatial_scale, gamma;
  int64_t sampling_ratio;
};

RoIPoolGeom check_deform_roi_pool(const at::Tensor& input, const at::Tensor& rois, const OptTensor& offset,
                                  int64_t pooled_height, int64_t pooled_width, double spatial_scale,
                                  int64_t sampling_ratio, double gamma);

void check_deform_roi_pool_grad(const at::Tensor& grad_output, const at::Tensor& input, const RoIPoolGeom& g);

}  // namespace mmdcnv2
