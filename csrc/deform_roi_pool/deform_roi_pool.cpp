// Schemas of the deformable RoI pooling ops (defined once, here) and their argument checks.
#include "deform_roi_pool.h"

#include "../common/bilinear.h"

#include <torch/library.h>

namespace mmdcnv2 {

RoIPoolGeom check_deform_roi_pool(const at::Tensor& input, const at::Tensor& rois, const OptTensor& offset,
                                  int64_t pooled_height, int64_t pooled_width, double spatial_scale,
                                  int64_t sampling_ratio, double gamma) {
  TORCH_CHECK_VALUE(input.dim() == 4, "deform_roi_pool: input must be 4-D (N, C, H, W), got ", input.dim(), "-D");
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()), "deform_roi_pool: input must be floating point, got ",
                    input.scalar_type());
  TORCH_CHECK_VALUE(rois.dim() == 2 && rois.size(1) == 5,
                    "deform_roi_pool: rois must have shape (K, 5) of (batch_index, x1, y1, x2, y2), got ",
                    rois.sizes());
  TORCH_CHECK_VALUE(rois.device() == input.device(), "deform_roi_pool: rois is on ", rois.device(), " but input is on ",
                    input.device());
  TORCH_CHECK_VALUE(rois.scalar_type() == input.scalar_type(), "deform_roi_pool: rois has dtype ", rois.scalar_type(),
                    " but input has dtype ", input.scalar_type());
  TORCH_CHECK_VALUE(pooled_height >= 1 && pooled_width >= 1, "deform_roi_pool: output_size must be >= 1, got (",
                    pooled_height, ", ", pooled_width, ")");
  int64_t out_numel = 0;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(rois.size(0), input.size(1), &out_numel) &&
                        !__builtin_mul_overflow(out_numel, pooled_height, &out_numel) &&
                        !__builtin_mul_overflow(out_numel, pooled_width, &out_numel),
                    "deform_roi_pool: the output (", rois.size(0), " RoIs x ", input.size(1),
                    " channels x output_size (", pooled_height, ", ", pooled_width, ")) overflows 64-bit integers");
  TORCH_CHECK_VALUE(sampling_ratio >= 0 && sampling_ratio <= kMaxRoISamples,
                    "deform_roi_pool: sampling_ratio must lie in [0, ", kMaxRoISamples, "] (0: adaptive, capped at ",
                    kMaxRoISamples, " samples per axis), got ", sampling_ratio);
  TORCH_CHECK_VALUE(std::isfinite(spatial_scale) && spatial_scale > 0,
                    "deform_roi_pool: spatial_scale must be a positive finite number, got ", spatial_scale);
  TORCH_CHECK_VALUE(std::isfinite(gamma), "deform_roi_pool: gamma must be finite, got ", gamma);
  if (offset) {
    const std::vector<int64_t> want = {rois.size(0), 2, pooled_height, pooled_width};
    TORCH_CHECK_VALUE(offset->sizes() == at::IntArrayRef(want), "deform_roi_pool: offset must have shape (",
                      rois.size(0), ", 2, ", pooled_height, ", ", pooled_width, "), got ", offset->sizes());
    TORCH_CHECK_VALUE(offset->device() == input.device() && offset->scalar_type() == input.scalar_type(),
                      "deform_roi_pool: offset must have input's device and dtype (", input.device(), ", ",
                      input.scalar_type(), "), got ", offset->device(), ", ", offset->scalar_type());
  }
  RoIPoolGeom g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.R = rois.size(0);
  g.PH = pooled_height;
  g.PW = pooled_width;
  g.spatial_scale = spatial_scale;
  g.gamma = gamma;
  g.sampling_ratio = sampling_ratio;
  return g;
}

void check_deform_roi_pool_grad(const at::Tensor& grad_output, const at::Tensor& input, const RoIPoolGeom& g) {
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef({g.R, g.C, g.PH, g.PW}),
                    "deform_roi_pool_backward: grad_output must have shape (", g.R, ", ", g.C, ", ", g.PH, ", ", g.PW,
                    "), got ", grad_output.sizes());
  TORCH_CHECK_VALUE(grad_output.device() == input.device() && grad_output.scalar_type() == input.scalar_type(),
                    "deform_roi_pool_backward: grad_output must have input's device and dtype");
}

}  // namespace mmdcnv2

TORCH_LIBRARY_FRAGMENT(mmdcnv2, m) {
  m.def(mmdcnv2::kDeformRoIPoolSchema);
  m.def(mmdcnv2::kDeformRoIPoolBackwardSchema);
}
