// CUDA registration of deformable RoI pooling. The kernels and the op bodies are in
// deform_roi_pool_kernels.cuh, shared with the host emulation that the tests run on the CPU.
#include <torch/library.h>

#include "deform_roi_pool_kernels.cuh"

TORCH_LIBRARY_IMPL(mmdcnv2, CUDA, m) {
  m.impl("deform_roi_pool", &mmdcnv2::cudadev::deform_roi_pool_gpu);
  m.impl("deform_roi_pool_backward", &mmdcnv2::cudadev::deform_roi_pool_backward_gpu);
}
