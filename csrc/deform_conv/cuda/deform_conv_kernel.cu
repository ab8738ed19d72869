// CUDA kernels of the deformable convolution, on the same channels-last algorithm as the CPU:
// im2col and col2im run one thread per (row, tap, channel), so neighbouring threads read
// neighbouring channels of a corner (coalesced); the offset and mask gradients run one warp
// per (row, deform group, tap) and reduce over its channels. Half and bfloat16 accumulate in float.
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "../../common/bilinear.h"
#include "../../common/cuda_launch.h"
#include "../deform_conv.h"

namespace mmdcnv2 {
namespace {

template <typename scalar_t, typename acc_t>
__device__ inline BilinearSample<acc_t> tap_sample(const DeformConvGeom& g, const scalar_t* off, const scalar_t* msk,
                                                   int64_t i, int64_t p, int64_t dg, int64_t k, acc_t& m,
                                                   int64_t& off_y) {
  const int64_t K = g.kh * g.kw, P = g.Ho * g.Wo;
  const int64_t ho = p / g.Wo, wo = p % g.Wo, ki = k / g.kw, kj = k % g.kw;
  off_y = ((i * g.dgroups + dg) * K + k) * 2 * P + p;
  const acc_t y = static_cast<acc_t>(ho * g.sh - g.ph + ki * g.dh) + static_cast<acc_t>(off[off_y]);
  const acc_t x = static_cast<acc_t>(wo * g.sw - g.pw + kj * g.dw) + static_cast<acc_t>(off[off_y + P]);
  m = msk ? static_cast<acc_t>(msk[((i * g.dgroups + dg) * K + k) * P + p]) : acc_t(1);
  return bilinear_sample<acc_t>(y, x, g.H, g.W);
}

// Thread t handles row r, tap k, channel c with t = (r * K + k) * C + c.
template <typename scalar_t, typename acc_t>
__global__ void im2col_kernel(int64_t total, int64_t row0, const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ off, const scalar_t* __restrict__ msk,
                              scalar_t* __restrict__ cols, DeformConvGeom g) {
  const int64_t K = g.kh * g.kw, P = g.Ho * g.Wo, C = g.C, Cg = C / g.groups, Cdg = C / g.dgroups;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = t % C, k = (t / C) % K, rr = t / (C * K), r = row0 + rr;
    const int64_t i = r / P, p = r % P, gi = c / Cg;
    acc_t m;
    int64_t off_y;
    const auto s = tap_sample<scalar_t, acc_t>(g, off, msk, i, p, c / Cdg, k, m, off_y);
    acc_t v = 0;
    const scalar_t* xi = x + i * g.H * g.W * C + c;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (s.index[q] >= 0) v += s.weight[q] * static_cast<acc_t>(xi[s.index[q] * C]);
    }
    cols[rr * K * C + gi * K * Cg + k * Cg + (c - gi * Cg)] = static_cast<scalar_t>(v * m);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void col2im_kernel(int64_t total, int64_t row0, const scalar_t* __restrict__ gcols,
                              const scalar_t* __restrict__ off, const scalar_t* __restrict__ msk,
                              acc_t* __restrict__ gx, DeformConvGeom g) {
  const int64_t K = g.kh * g.kw, P = g.Ho * g.Wo, C = g.C, Cg = C / g.groups, Cdg = C / g.dgroups;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < total; t += int64_t(blockDim.x) * gridDim.x) {
    const int64_t c = t % C, k = (t / C) % K, rr = t / (C * K), r = row0 + rr;
    const int64_t i = r / P, p = r % P, gi = c / Cg;
    acc_t m;
    int64_t off_y;
    const auto s = tap_sample<scalar_t, acc_t>(g, off, msk, i, p, c / Cdg, k, m, off_y);
    if (!s.inside) continue;
    const acc_t gv = m * static_cast<acc_t>(gcols[rr * K * C + gi * K * Cg + k * Cg + (c - gi * Cg)]);
    acc_t* gxi = gx + i * g.H * g.W * C + c;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (s.index[q] >= 0) gpuAtomicAdd(gxi + s.index[q] * C, s.weight[q] * gv);
    }
  }
}

// One warp per item (r, dg, k), item = (r * dgroups + dg) * K + k.
template <typename scalar_t, typename acc_t>
__global__ void coord_grad_kernel(int64_t items, int64_t row0, const scalar_t* __restrict__ x,
                                  const scalar_t* __restrict__ off,
                                  const scalar_t* __restrict__ msk, const scalar_t* __restrict__ gcols,
                                  scalar_t* __restrict__ goff, scalar_t* __restrict__ gmsk, DeformConvGeom g) {
  const int64_t K = g.kh * g.kw, P = g.Ho * g.Wo, C = g.C, Cg = C / g.groups, Cdg = C / g.dgroups;
  const int lane = threadIdx.x % 32;
  const int64_t warps = (int64_t(blockDim.x) * gridDim.x) / 32;
  for (int64_t item = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; item < items; item += warps) {
    const int64_t k = item % K, dg = (item / K) % g.dgroups, rr = item / (K * g.dgroups), r = row0 + rr;
    const int64_t i = r / P, p = r % P;
    acc_t m;
    int64_t off_y;
    const auto s = tap_sample<scalar_t, acc_t>(g, off, msk, i, p, dg, k, m, off_y);
    acc_t S[4] = {0, 0, 0, 0};
    if (s.inside) {
      const scalar_t* xi = x + i * g.H * g.W * C;
      const scalar_t* row = gcols + rr * K * C;
      for (int64_t c = dg * Cdg + lane; c < (dg + 1) * Cdg; c += 32) {
        const int64_t gi = c / Cg;
        const acc_t gc = static_cast<acc_t>(row[gi * K * Cg + k * Cg + (c - gi * Cg)]);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          if (s.index[q] >= 0) S[q] += gc * static_cast<acc_t>(xi[s.index[q] * C + c]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      for (int o = 16; o > 0; o /= 2) S[q] += __shfl_down_sync(0xffffffffu, S[q], o);
    }
    if (lane == 0) {
      acc_t value, d_h, d_w;
      bilinear_backward(s, S, value, d_h, d_w);
      goff[off_y] = static_cast<scalar_t>(m * d_h);
      goff[off_y + P] = static_cast<scalar_t>(m * d_w);
      if (gmsk) gmsk[((i * g.dgroups + dg) * K + k) * P + p] = static_cast<scalar_t>(value);
    }
  }
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

#define MMDCNV2_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

struct CudaKernels {
  static constexpr int64_t kColsBytes = int64_t(256) << 20;
  static void im2col(const at::Tensor& x, const at::Tensor& off, const std::optional<at::Tensor>& msk,
                     at::Tensor& cols, const DeformConvGeom& g, int64_t r0, int64_t r1) {
    const int64_t total = (r1 - r0) * g.K() * g.C;
    auto stream = at::cuda::getCurrentCUDAStream();
    MMDCNV2_DISPATCH(x.scalar_type(), "deform_conv2d_im2col_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      im2col_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
          total, r0, x.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk),
          cols.data_ptr<scalar_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  static void col2im(const at::Tensor& gcols, const at::Tensor& off, const std::optional<at::Tensor>& msk,
                     at::Tensor& gx, const DeformConvGeom& g, int64_t r0, int64_t r1) {
    const int64_t total = (r1 - r0) * g.K() * g.C;
    auto stream = at::cuda::getCurrentCUDAStream();
    MMDCNV2_DISPATCH(gcols.scalar_type(), "deform_conv2d_col2im_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      col2im_kernel<scalar_t, acc_t><<<grid_for(total), kThreads, 0, stream>>>(
          total, r0, gcols.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk),
          gx.data_ptr<acc_t>(), g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  static void coord_grad(const at::Tensor& x, const at::Tensor& off, const std::optional<at::Tensor>& msk,
                         const at::Tensor& gcols, at::Tensor& goff, std::optional<at::Tensor>& gmsk,
                         const DeformConvGeom& g, int64_t r0, int64_t r1) {
    const int64_t items = (r1 - r0) * g.dgroups * g.K();
    auto stream = at::cuda::getCurrentCUDAStream();
    MMDCNV2_DISPATCH(x.scalar_type(), "deform_conv2d_coord_grad_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      coord_grad_kernel<scalar_t, acc_t><<<grid_for(items * 32), kThreads, 0, stream>>>(
          items, r0, x.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk), gcols.data_ptr<scalar_t>(),
          goff.data_ptr<scalar_t>(), gmsk ? gmsk->data_ptr<scalar_t>() : nullptr, g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // The backward's sampling pass (the CPU fuses it; here the columns and the coordinate
  // gradients are two kernels).
  static void im2col_coord_grad(const at::Tensor& x, const at::Tensor& off, const std::optional<at::Tensor>& msk,
                                const at::Tensor& gcols, at::Tensor& cols, at::Tensor& goff,
                                std::optional<at::Tensor>& gmsk, const DeformConvGeom& g, int64_t r0, int64_t r1) {
    im2col(x, off, msk, cols, g, r0, r1);
    coord_grad(x, off, msk, gcols, goff, gmsk, g, r0, r1);
  }
};

at::Tensor deform_conv2d_cuda(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                              const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                              int64_t deform_groups) {
  const auto g = check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups);
  c10::cuda::CUDAGuard guard(input.device());
  return deform_conv2d_forward_impl<CudaKernels>(input, weight, offset, mask, bias, g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  const auto g = check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups);
  check_deform_conv_grad(grad_output, input, g);
  // grad_input is scattered with atomics: its summation order varies from run to run.
  at::globalContext().alertNotDeterministic("mmdcnv2::deform_conv2d_backward (CUDA)");
  c10::cuda::CUDAGuard guard(input.device());
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return deform_conv2d_backward_impl<CudaKernels>(grad_output, input, weight, offset, mask, bias, g, acc);
}

}  // namespace
}  // namespace mmdcnv2

TORCH_LIBRARY_IMPL(mmdcnv2, CUDA, m) {
  m.impl("deform_conv2d", &mmdcnv2::deform_conv2d_cuda);
  m.impl("deform_conv2d_backward", &mmdcnv2::deform_conv2d_backward_cuda);
}
