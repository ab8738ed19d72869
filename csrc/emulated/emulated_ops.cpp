// The CUDA kernels' own source, compiled by the host compiler over the emulated device layer
// (csrc/common/device.h) and exposed as torch.ops.mmdcnv2_emulated.* on CPU tensors. They run
// through the same op bodies and the same driver as the CUDA build (same column chunks, same
// launch sizes), so the test suite checks the CUDA code on machines without a GPU. For testing:
// every block and thread of each grid runs, one warp at a time, which is slow.
//
// Also here, for the tests: the launch sizes the driver would use for a given geometry, computed
// without allocating (meta tensors are fine), so that limits can be checked for huge tensors.
#define MMDCNV2_EMULATE 1
#include <torch/library.h>

#include "../deform_conv/cuda/deform_conv_kernels.cuh"
#include "../deform_roi_pool/cuda/deform_roi_pool_kernels.cuh"

namespace mmdcnv2 {
namespace emudev {
namespace {

std::vector<int64_t> launch_config_op(int64_t items, int64_t threads_per_item) {
  TORCH_CHECK_VALUE(threads_per_item == 1 || threads_per_item == kWarpSize,
                    "launch_config: threads_per_item must be 1 or ", kWarpSize, ", got ", threads_per_item);
  const auto c = launch_config(items, static_cast<int>(threads_per_item));
  return {c.blocks, c.threads};
}

// [images per block, forward chunk rows, backward chunk rows, forward column bytes, backward column
//  bytes (both buffers), then blocks of im2col, col2im and coord_grad for a full backward chunk,
//  and threads per block]
std::vector<int64_t> deform_conv2d_launch_plan(const at::Tensor& input, const at::Tensor& weight,
                                               const at::Tensor& offset, const OptTensor& mask, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                               int64_t deform_groups) {
  const auto g =
      check_deform_conv(input, weight, offset, mask, kNullopt, stride, padding, dilation, groups, deform_groups);
  const int64_t es = input.element_size();
  const int64_t nb = deform_conv_block(g, es);
  const int64_t rows = nb * g.P();
  const int64_t fwd = deform_conv_chunk_rows<GpuKernels>(g, es, rows, 1);
  const int64_t bwd = deform_conv_chunk_rows<GpuKernels>(g, es, rows, 2);
  const auto im2col = launch_config(bwd * g.K() * g.C);
  const auto col2im = launch_config(bwd * g.K() * g.C);
  const auto coord = launch_config(bwd * g.dgroups * g.K(), kWarpSize);
  return {nb,           fwd,           bwd, fwd * g.ldc() * es, 2 * bwd * g.ldc() * es, im2col.blocks, col2im.blocks,
          coord.blocks, im2col.threads};
}

}  // namespace
}  // namespace emudev
}  // namespace mmdcnv2

TORCH_LIBRARY(mmdcnv2_emulated, m) {
  m.def(mmdcnv2::kDeformConv2dSchema);
  m.def(mmdcnv2::kDeformConv2dBackwardSchema);
  m.def(mmdcnv2::kDeformRoIPoolSchema);
  m.def(mmdcnv2::kDeformRoIPoolBackwardSchema);
  m.def("launch_config(int items, int threads_per_item) -> int[]", &mmdcnv2::emudev::launch_config_op);
  m.def(
      "deform_conv2d_launch_plan(Tensor input, Tensor weight, Tensor offset, Tensor? mask, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, int deform_groups) -> int[]");
}

TORCH_LIBRARY_IMPL(mmdcnv2_emulated, CPU, m) {
  m.impl("deform_conv2d", &mmdcnv2::emudev::deform_conv2d_gpu);
  m.impl("deform_conv2d_backward", &mmdcnv2::emudev::deform_conv2d_backward_gpu);
  m.impl("deform_roi_pool", &mmdcnv2::emudev::deform_roi_pool_gpu);
  m.impl("deform_roi_pool_backward", &mmdcnv2::emudev::deform_roi_pool_backward_gpu);
}

TORCH_LIBRARY_IMPL(mmdcnv2_emulated, CompositeExplicitAutograd, m) {
  m.impl("deform_conv2d_launch_plan", &mmdcnv2::emudev::deform_conv2d_launch_plan);
}
