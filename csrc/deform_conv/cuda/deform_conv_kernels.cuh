// The GPU kernels of the deformable convolution and the ops built on them, written once against
// the device layer (csrc/common/device.h). deform_conv_kernel.cu compiles them for CUDA;
// csrc/emulated/emulated_ops.cpp compiles the same text for the host emulation that the test
// suite runs on the CPU (torch.ops.mmdcnv2_emulated.*). Same driver (deform_conv.h), same
// column chunks, same launch sizes: only the device layer differs.
//
// Channels-last algorithm, as on the CPU: im2col and col2im run one thread per
// (row, tap, channel), so neighbouring threads read neighbouring channels of a corner
// (coalesced); the offset and mask gradients run one warp per (row, deform group, tap) and
// reduce over its channels with shuffles. Half and bfloat16 accumulate in float.
// A sample off the map (non-finite positions included) contributes exactly zero, whatever
// its mask (NaN and inf included), and passes zero gradient to input, offset and mask.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../../common/bilinear.h"
#include "../../common/device.h"
#include "../deform_conv.h"

namespace mmdcnv2 {
namespace MMDCNV2_DEV_NS {

template <typename scalar_t, typename acc_t>
MMDCNV2_DEVICE BilinearSample<acc_t> tap_sample(const DeformConvGeom& g, const scalar_t* off, const scalar_t* msk,
                                                int64_t i, int64_t p, int64_t dg, int64_t k, acc_t& m, int64_t& off_y) {
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
MMDCNV2_KERNEL void im2col_kernel(int64_t total, int64_t row0, const scalar_t* __restrict__ x,
                                  const scalar_t* __restrict__ off, const scalar_t* __restrict__ msk,
                                  scalar_t* __restrict__ cols, DeformConvGeom g) {
  const int64_t K = g.kh * g.kw, P = g.Ho * g.Wo, C = g.C, Cg = C / g.groups, Cdg = C / g.dgroups;
  for (int64_t t = dev::global_thread(); t < total; t += dev::grid_threads()) {
    const int64_t c = t % C, k = (t / C) % K, rr = t / (C * K), r = row0 + rr;
    const int64_t i = r / P, p = r % P, gi = c / Cg;
    acc_t m;
    int64_t off_y;
    const auto s = tap_sample<scalar_t, acc_t>(g, off, msk, i, p, c / Cdg, k, m, off_y);
    acc_t v = 0;
    const scalar_t* xi = x + i * g.H * g.W * C + c;
    MMDCNV2_UNROLL
    for (int q = 0; q < 4; ++q) {
      if (s.index[q] >= 0) v += s.weight[q] * static_cast<acc_t>(xi[s.index[q] * C]);
    }
    cols[rr * K * C + gi * K * Cg + k * Cg + (c - gi * Cg)] = static_cast<scalar_t>(s.inside ? v * m : acc_t(0));
  }
}

template <typename scalar_t, typename acc_t>
MMDCNV2_KERNEL void col2im_kernel(int64_t total, int64_t row0, const scalar_t* __restrict__ gcols,
                                  const scalar_t* __restrict__ off, const scalar_t* __restrict__ msk,
                                  acc_t* __restrict__ gx, DeformConvGeom g) {
  const int64_t K = g.kh * g.kw, P = g.Ho * g.Wo, C = g.C, Cg = C / g.groups, Cdg = C / g.dgroups;
  for (int64_t t = dev::global_thread(); t < total; t += dev::grid_threads()) {
    const int64_t c = t % C, k = (t / C) % K, rr = t / (C * K), r = row0 + rr;
    const int64_t i = r / P, p = r % P, gi = c / Cg;
    acc_t m;
    int64_t off_y;
    const auto s = tap_sample<scalar_t, acc_t>(g, off, msk, i, p, c / Cdg, k, m, off_y);
    if (!s.inside) continue;
    const acc_t gv = m * static_cast<acc_t>(gcols[rr * K * C + gi * K * Cg + k * Cg + (c - gi * Cg)]);
    acc_t* gxi = gx + i * g.H * g.W * C + c;
    MMDCNV2_UNROLL
    for (int q = 0; q < 4; ++q) {
      if (s.index[q] >= 0) dev::atomic_add(gxi + s.index[q] * C, s.weight[q] * gv);
    }
  }
}

// One warp per item (r, dg, k), item = (r * dgroups + dg) * K + k. The loop over items is
// uniform across the warp (all lanes share the item), as the full-mask shuffles require.
template <typename scalar_t, typename acc_t>
MMDCNV2_KERNEL void coord_grad_kernel(int64_t items, int64_t row0, const scalar_t* __restrict__ x,
                                      const scalar_t* __restrict__ off, const scalar_t* __restrict__ msk,
                                      const scalar_t* __restrict__ gcols, scalar_t* __restrict__ goff,
                                      scalar_t* __restrict__ gmsk, DeformConvGeom g) {
  const int64_t K = g.kh * g.kw, P = g.Ho * g.Wo, C = g.C, Cg = C / g.groups, Cdg = C / g.dgroups;
  const int lane = dev::lane();
  const int64_t warps = dev::grid_threads() / kWarpSize;
  for (int64_t item = dev::global_thread() / kWarpSize; item < items; item += warps) {
    const int64_t k = item % K, dg = (item / K) % g.dgroups, rr = item / (K * g.dgroups), r = row0 + rr;
    const int64_t i = r / P, p = r % P;
    acc_t m;
    int64_t off_y;
    const auto s = tap_sample<scalar_t, acc_t>(g, off, msk, i, p, dg, k, m, off_y);
    acc_t S[4] = {0, 0, 0, 0};
    if (s.inside) {
      const scalar_t* xi = x + i * g.H * g.W * C;
      const scalar_t* row = gcols + rr * K * C;
      for (int64_t c = dg * Cdg + lane; c < (dg + 1) * Cdg; c += kWarpSize) {
        const int64_t gi = c / Cg;
        const acc_t gc = static_cast<acc_t>(row[gi * K * Cg + k * Cg + (c - gi * Cg)]);
        MMDCNV2_UNROLL
        for (int q = 0; q < 4; ++q) {
          if (s.index[q] >= 0) S[q] += gc * static_cast<acc_t>(xi[s.index[q] * C + c]);
        }
      }
    }
    MMDCNV2_UNROLL
    for (int q = 0; q < 4; ++q) {
      for (unsigned o = kWarpSize / 2; o > 0; o /= 2) S[q] += dev::shfl_down(S[q], o);
    }
    if (lane == 0) {
      acc_t value, d_h, d_w;
      bilinear_backward(s, S, value, d_h, d_w);
      goff[off_y] = static_cast<scalar_t>(s.inside ? m * d_h : acc_t(0));
      goff[off_y + P] = static_cast<scalar_t>(s.inside ? m * d_w : acc_t(0));
      if (gmsk) gmsk[((i * g.dgroups + dg) * K + k) * P + p] = static_cast<scalar_t>(value);
    }
  }
}

template <typename T>
const T* opt_ptr(const OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

#ifndef MMDCNV2_DISPATCH
#define MMDCNV2_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
#endif

struct GpuKernels {
  static constexpr int64_t kColsBytes = int64_t(256) << 20;
  static constexpr int64_t kMinRows = 1;  // the GPU's GEMMs stay efficient on small chunks
  static void im2col(const at::Tensor& x, const at::Tensor& off, const OptTensor& msk, at::Tensor& cols,
                     const DeformConvGeom& g, int64_t r0, int64_t r1) {
    const int64_t total = (r1 - r0) * g.K() * g.C;
    MMDCNV2_DISPATCH(x.scalar_type(), "deform_conv2d_im2col", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dev::launch(&im2col_kernel<scalar_t, acc_t>, launch_config(total), total, r0, x.data_ptr<scalar_t>(),
                  off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk), cols.data_ptr<scalar_t>(), g);
    });
  }
  static void col2im(const at::Tensor& gcols, const at::Tensor& off, const OptTensor& msk, at::Tensor& gx,
                     const DeformConvGeom& g, int64_t r0, int64_t r1) {
    const int64_t total = (r1 - r0) * g.K() * g.C;
    MMDCNV2_DISPATCH(gcols.scalar_type(), "deform_conv2d_col2im", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dev::launch(&col2im_kernel<scalar_t, acc_t>, launch_config(total), total, r0, gcols.data_ptr<scalar_t>(),
                  off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk), gx.data_ptr<acc_t>(), g);
    });
  }
  static void coord_grad(const at::Tensor& x, const at::Tensor& off, const OptTensor& msk, const at::Tensor& gcols,
                         at::Tensor& goff, OptTensor& gmsk, const DeformConvGeom& g, int64_t r0, int64_t r1) {
    const int64_t items = (r1 - r0) * g.dgroups * g.K();
    MMDCNV2_DISPATCH(x.scalar_type(), "deform_conv2d_coord_grad", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dev::launch(&coord_grad_kernel<scalar_t, acc_t>, launch_config(items, kWarpSize), items, r0,
                  x.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk), gcols.data_ptr<scalar_t>(),
                  goff.data_ptr<scalar_t>(), gmsk ? gmsk->data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr), g);
    });
  }
  // The backward's sampling pass (the CPU fuses it; here the columns and the coordinate
  // gradients are two kernels).
  static void im2col_coord_grad(const at::Tensor& x, const at::Tensor& off, const OptTensor& msk,
                                const at::Tensor& gcols, at::Tensor& cols, at::Tensor& goff, OptTensor& gmsk,
                                const DeformConvGeom& g, int64_t r0, int64_t r1) {
    im2col(x, off, msk, cols, g, r0, r1);
    coord_grad(x, off, msk, gcols, goff, gmsk, g, r0, r1);
  }
};

inline at::Tensor deform_conv2d_gpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                    const OptTensor& mask, const OptTensor& bias, at::IntArrayRef stride,
                                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                    int64_t deform_groups) {
  const auto g = check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups);
  dev::Guard guard(input.device());
  return deform_conv2d_forward_impl<GpuKernels>(input, weight, offset, mask, bias, g);
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_gpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const OptTensor& mask, const OptTensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  const auto g = check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups);
  check_deform_conv_grad(grad_output, input, g);
  // grad_input is scattered with atomics: its summation order varies from run to run.
  at::globalContext().alertNotDeterministic(std::string("mmdcnv2::deform_conv2d_backward (") + dev::kName + ")");
  dev::Guard guard(input.device());
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return deform_conv2d_backward_impl<GpuKernels>(grad_output, input, weight, offset, mask, bias, g, acc);
}

}  // namespace MMDCNV2_DEV_NS
}  // namespace mmdcnv2
