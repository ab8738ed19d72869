// The GPU kernels of deformable RoI pooling and the ops built on them, written once against the
// device layer (csrc/common/device.h): deform_roi_pool_kernel.cu compiles them for CUDA,
// csrc/emulated/emulated_ops.cpp for the host emulation the tests run on the CPU.
//
// Channels-last input: one thread per (bin, channel) for the output and the input gradient
// (neighbouring threads read neighbouring channels), one warp per bin for the offset gradient.
// RoIs whose batch index is not in [0, N) (NaN included) give zero output and zero gradient:
// checking them would need a device synchronisation. Half and bfloat16 accumulate in float.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "../../common/bilinear.h"
#include "../../common/device.h"
#include "../deform_roi_pool.h"

namespace mmdcnv2 {
namespace MMDCNV2_DEV_NS {

template <typename scalar_t, typename acc_t>
MMDCNV2_DEVICE RoIBin<acc_t> bin_of(const RoIPoolGeom& g, const scalar_t* rois, const scalar_t* off, int64_t t,
                                    int64_t& batch) {
  const int64_t k = t / (g.PH * g.PW), ph = (t / g.PW) % g.PH, pw = t % g.PW;
  const scalar_t* roi = rois + k * 5;
  // NaN, and values outside [0, N) (fractions in (-1, 0) included), pool nothing. Tested on the
  // float before the conversion, which would truncate them towards 0 (and is undefined for NaN).
  const acc_t bf = static_cast<acc_t>(roi[0]);
  batch = (bf >= acc_t(0) && bf < static_cast<acc_t>(g.N)) ? static_cast<int64_t>(bf) : int64_t(-1);
  const acc_t dx = off ? static_cast<acc_t>(off[(k * 2) * g.PH * g.PW + ph * g.PW + pw]) : acc_t(0);
  const acc_t dy = off ? static_cast<acc_t>(off[(k * 2 + 1) * g.PH * g.PW + ph * g.PW + pw]) : acc_t(0);
  return roi_bin<acc_t>(static_cast<acc_t>(roi[1]), static_cast<acc_t>(roi[2]), static_cast<acc_t>(roi[3]),
                        static_cast<acc_t>(roi[4]), ph, pw, g.PH, g.PW, static_cast<acc_t>(g.spatial_scale),
                        g.sampling_ratio, static_cast<acc_t>(g.gamma), dx, dy);
}

template <typename acc_t>
MMDCNV2_DEVICE ClampedSample<acc_t> sample_of(const RoIPoolGeom& g, const RoIBin<acc_t>& bin, int64_t iy, int64_t ix) {
  return clamped_sample<acc_t>(bin.y0 + (acc_t(iy) + acc_t(0.5)) * bin.step_y,
                               bin.x0 + (acc_t(ix) + acc_t(0.5)) * bin.step_x, g.H, g.W);
}

template <typename scalar_t, typename acc_t>
MMDCNV2_KERNEL void forward_kernel(int64_t total, const scalar_t* __restrict__ x, const scalar_t* __restrict__ rois,
                                   const scalar_t* __restrict__ off, scalar_t* __restrict__ out, RoIPoolGeom g) {
  for (int64_t i = dev::global_thread(); i < total; i += dev::grid_threads()) {
    const int64_t c = i % g.C, t = i / g.C;
    int64_t batch;
    const auto bin = bin_of<scalar_t, acc_t>(g, rois, off, t, batch);
    acc_t v = 0;
    if (batch >= 0 && batch < g.N) {
      const scalar_t* xb = x + batch * g.H * g.W * g.C + c;
      for (int64_t iy = 0; iy < bin.grid_h; ++iy) {
        for (int64_t ix = 0; ix < bin.grid_w; ++ix) {
          const auto s = sample_of(g, bin, iy, ix);
          if (!s.inside) continue;
          MMDCNV2_UNROLL
          for (int q = 0; q < 4; ++q) v += s.weight[q] * static_cast<acc_t>(xb[s.index[q] * g.C]);
        }
      }
    }
    out[i] = static_cast<scalar_t>(v * bin.inv_count);
  }
}

template <typename scalar_t, typename acc_t>
MMDCNV2_KERNEL void input_grad_kernel(int64_t total, const scalar_t* __restrict__ rois,
                                      const scalar_t* __restrict__ off, const scalar_t* __restrict__ gout,
                                      acc_t* __restrict__ gx, RoIPoolGeom g) {
  for (int64_t i = dev::global_thread(); i < total; i += dev::grid_threads()) {
    const int64_t c = i % g.C, t = i / g.C;
    int64_t batch;
    const auto bin = bin_of<scalar_t, acc_t>(g, rois, off, t, batch);
    if (batch < 0 || batch >= g.N) continue;
    const acc_t go = static_cast<acc_t>(gout[i]) * bin.inv_count;
    acc_t* gb = gx + batch * g.H * g.W * g.C + c;
    for (int64_t iy = 0; iy < bin.grid_h; ++iy) {
      for (int64_t ix = 0; ix < bin.grid_w; ++ix) {
        const auto s = sample_of(g, bin, iy, ix);
        if (!s.inside) continue;
        MMDCNV2_UNROLL
        for (int q = 0; q < 4; ++q) dev::atomic_add(gb + s.index[q] * g.C, s.weight[q] * go);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
MMDCNV2_KERNEL void offset_grad_kernel(int64_t bins, const scalar_t* __restrict__ x, const scalar_t* __restrict__ rois,
                                       const scalar_t* __restrict__ off, const scalar_t* __restrict__ gout,
                                       scalar_t* __restrict__ goff, RoIPoolGeom g) {
  const int lane = dev::lane();
  const int64_t warps = dev::grid_threads() / kWarpSize;
  for (int64_t t = dev::global_thread() / kWarpSize; t < bins; t += warps) {
    int64_t batch;
    const auto bin = bin_of<scalar_t, acc_t>(g, rois, off, t, batch);
    acc_t sum_y = 0, sum_x = 0;
    if (batch >= 0 && batch < g.N) {
      const scalar_t* xb = x + batch * g.H * g.W * g.C;
      const scalar_t* go = gout + t * g.C;
      for (int64_t iy = 0; iy < bin.grid_h; ++iy) {
        for (int64_t ix = 0; ix < bin.grid_w; ++ix) {
          const auto s = sample_of(g, bin, iy, ix);
          if (!s.inside) continue;
          acc_t S[4] = {0, 0, 0, 0};
          for (int64_t c = lane; c < g.C; c += kWarpSize) {
            const acc_t gc = static_cast<acc_t>(go[c]);
            MMDCNV2_UNROLL
            for (int q = 0; q < 4; ++q) S[q] += gc * static_cast<acc_t>(xb[s.index[q] * g.C + c]);
          }
          acc_t d_y, d_x;
          clamped_backward(s, S, d_y, d_x);  // linear in S: lanes' partial sums add up
          sum_y += d_y;
          sum_x += d_x;
        }
      }
    }
    for (unsigned o = kWarpSize / 2; o > 0; o /= 2) {
      sum_y += dev::shfl_down(sum_y, o);
      sum_x += dev::shfl_down(sum_x, o);
    }
    if (lane == 0) {
      const int64_t k = t / (g.PH * g.PW), b = t % (g.PH * g.PW);
      const acc_t gamma = static_cast<acc_t>(g.gamma);
      goff[(k * 2) * g.PH * g.PW + b] = static_cast<scalar_t>(gamma * bin.roi_w * bin.inv_count * sum_x);
      goff[(k * 2 + 1) * g.PH * g.PW + b] = static_cast<scalar_t>(gamma * bin.roi_h * bin.inv_count * sum_y);
    }
  }
}

#ifndef MMDCNV2_DISPATCH
#define MMDCNV2_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
#endif

inline at::Tensor deform_roi_pool_gpu(const at::Tensor& input, const at::Tensor& rois, const OptTensor& offset,
                                      int64_t pooled_height, int64_t pooled_width, double spatial_scale,
                                      int64_t sampling_ratio, double gamma) {
  const auto g =
      check_deform_roi_pool(input, rois, offset, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
  dev::Guard guard(input.device());
  const auto x = input.permute({0, 2, 3, 1}).contiguous();
  const auto r = rois.contiguous();
  const auto off = offset ? OptTensor(offset->contiguous()) : kNullopt;
  auto out = at::zeros({g.R, g.PH, g.PW, g.C}, input.options());
  const int64_t total = out.numel();
  if (total > 0 && g.H > 0 && g.W > 0) {
    MMDCNV2_DISPATCH(input.scalar_type(), "deform_roi_pool_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dev::launch(&forward_kernel<scalar_t, acc_t>, launch_config(total), total, x.data_ptr<scalar_t>(),
                  r.data_ptr<scalar_t>(), off ? off->data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr),
                  out.data_ptr<scalar_t>(), g);
    });
  }
  return out.permute({0, 3, 1, 2}).contiguous();
}

inline std::tuple<at::Tensor, at::Tensor> deform_roi_pool_backward_gpu(const at::Tensor& grad_output,
                                                                       const at::Tensor& input, const at::Tensor& rois,
                                                                       const OptTensor& offset, int64_t pooled_height,
                                                                       int64_t pooled_width, double spatial_scale,
                                                                       int64_t sampling_ratio, double gamma) {
  const auto g =
      check_deform_roi_pool(input, rois, offset, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
  check_deform_roi_pool_grad(grad_output, input, g);
  at::globalContext().alertNotDeterministic(std::string("mmdcnv2::deform_roi_pool_backward (") + dev::kName + ")");
  dev::Guard guard(input.device());
  const auto x = input.permute({0, 2, 3, 1}).contiguous();
  const auto r = rois.contiguous();
  const auto off = offset ? OptTensor(offset->contiguous()) : kNullopt;
  const auto go = grad_output.permute({0, 2, 3, 1}).contiguous();
  const auto acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto gx = at::zeros({g.N, g.H, g.W, g.C}, input.options().dtype(acc));
  auto goff = offset ? at::zeros(offset->sizes(), input.options()) : at::empty({0}, input.options());
  const int64_t total = go.numel();
  if (total > 0 && g.H > 0 && g.W > 0) {
    MMDCNV2_DISPATCH(input.scalar_type(), "deform_roi_pool_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* offp = off ? off->data_ptr<scalar_t>() : nullptr;
      dev::launch(&input_grad_kernel<scalar_t, acc_t>, launch_config(total), total, r.data_ptr<scalar_t>(), offp,
                  go.data_ptr<scalar_t>(), gx.data_ptr<acc_t>(), g);
      if (off) {
        const int64_t bins = g.R * g.PH * g.PW;
        dev::launch(&offset_grad_kernel<scalar_t, acc_t>, launch_config(bins, kWarpSize), bins, x.data_ptr<scalar_t>(),
                    r.data_ptr<scalar_t>(), offp, go.data_ptr<scalar_t>(), goff.data_ptr<scalar_t>(), g);
      }
    });
  }
  return {gx.permute({0, 3, 1, 2}).contiguous().to(input.scalar_type()), goff};
}

}  // namespace MMDCNV2_DEV_NS
}  // namespace mmdcnv2
