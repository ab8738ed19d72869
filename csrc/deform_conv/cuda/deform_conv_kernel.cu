// CUDA registration of the deformable convolution. The kernels and the op bodies are in
// deform_conv_kernels.cuh, shared with the host emulation that the tests run on the CPU.
#include <torch/library.h>

#include "deform_conv_kernels.cuh"

TORCH_LIBRARY_IMPL(mmdcnv2, CUDA, m) {
  m.impl("deform_conv2d", &mmdcnv2::cudadev::deform_conv2d_gpu);
  m.impl("deform_conv2d_backward", &mmdcnv2::cudadev::deform_conv2d_backward_gpu);
}
