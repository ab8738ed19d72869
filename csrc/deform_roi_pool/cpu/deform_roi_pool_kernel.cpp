// CPU kernels of deformable RoI pooling: channels-last samples, all cores, no atomics
// (the input gradient is partitioned by channel). float16/bfloat16 run in float32.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../../common/bilinear.h"
#include "../../common/cpu_vec.h"
#include "../deform_roi_pool.h"

namespace mmdcnv2 {
namespace {

// Calls fn(sample) for every sample of bin t that falls on the map.
template <typename T, typename F>
inline void for_each_sample(const RoIPoolGeom& g, const T* rois, const T* off, int64_t t, RoIBin<T>& bin,
                            int64_t& batch, F&& fn) {
  const int64_t k = t / (g.PH * g.PW), ph = (t / g.PW) % g.PH, pw = t % g.PW;
  const T* roi = rois + k * 5;
  batch = static_cast<int64_t>(roi[0]);
  const T dx = off ? off[(k * 2) * g.PH * g.PW + ph * g.PW + pw] : T(0);
  const T dy = off ? off[(k * 2 + 1) * g.PH * g.PW + ph * g.PW + pw] : T(0);
  bin = roi_bin<T>(roi[1], roi[2], roi[3], roi[4], ph, pw, g.PH, g.PW, static_cast<T>(g.spatial_scale),
                   g.sampling_ratio, static_cast<T>(g.gamma), dx, dy);
  for (int64_t iy = 0; iy < bin.grid_h; ++iy) {
    const T y = bin.y0 + (T(iy) + T(0.5)) * bin.step_y;
    for (int64_t ix = 0; ix < bin.grid_w; ++ix) {
      const T x = bin.x0 + (T(ix) + T(0.5)) * bin.step_x;
      const auto s = clamped_sample<T>(y, x, g.H, g.W);
      if (s.inside) fn(s);
    }
  }
}

inline int64_t bin_grain(const RoIPoolGeom& g) {
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, g.C * 4));
}

template <typename T>
void forward_kernel(const T* x, const T* rois, const T* off, T* out, const RoIPoolGeom& g) {
  const int64_t C = g.C, HW = g.H * g.W;
  at::parallel_for(0, g.R * g.PH * g.PW, bin_grain(g), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      T* dst = out + t * C;
      RoIBin<T> bin;
      int64_t batch;
      for_each_sample(g, rois, off, t, bin, batch, [&](const ClampedSample<T>& s) {
        const T* xb = x + batch * HW * C;
        for (int q = 0; q < 4; ++q) vec::axpy(dst, xb + s.index[q] * C, s.weight[q] * bin.inv_count, C);
      });
    }
  });
}

template <typename T>
void offset_grad_kernel(const T* x, const T* rois, const T* off, const T* gout, T* goff, const RoIPoolGeom& g) {
  const int64_t C = g.C, HW = g.H * g.W, bins = g.PH * g.PW;
  at::parallel_for(0, g.R * bins, bin_grain(g), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const T* go = gout + t * C;
      T sum_y = 0, sum_x = 0;
      RoIBin<T> bin;
      int64_t batch;
      for_each_sample(g, rois, off, t, bin, batch, [&](const ClampedSample<T>& s) {
        const T* xb = x + batch * HW * C;
        T S[4] = {0, 0, 0, 0};
        vec::dot4(go, xb + s.index[0] * C, xb + s.index[1] * C, xb + s.index[2] * C, xb + s.index[3] * C, S, C);
        T d_y, d_x;
        clamped_backward(s, S, d_y, d_x);
        sum_y += d_y;
        sum_x += d_x;
      });
      const int64_t k = t / bins, b = t % bins;
      goff[(k * 2) * bins + b] = static_cast<T>(g.gamma) * bin.roi_w * bin.inv_count * sum_x;
      goff[(k * 2 + 1) * bins + b] = static_cast<T>(g.gamma) * bin.roi_h * bin.inv_count * sum_y;
    }
  });
}

// Each task owns a slice of channels of every pixel: no two tasks write one address.
template <typename T>
void input_grad_kernel(const T* rois, const T* off, const T* gout, T* gx, const RoIPoolGeom& g) {
  const int64_t C = g.C, HW = g.H * g.W, total = g.R * g.PH * g.PW;
  const int64_t threads = total * C < (int64_t(1) << 15) ? 1 : at::get_num_threads();
  const int64_t piece = std::max<int64_t>(16, (C + 2 * threads - 1) / (2 * threads));
  const int64_t ntasks = (C + piece - 1) / piece;
  at::parallel_for(0, ntasks, threads == 1 ? ntasks : 1, [&](int64_t p0, int64_t p1) {
    for (int64_t pi = p0; pi < p1; ++pi) {
      const int64_t c0 = pi * piece, n = std::min(C, c0 + piece) - c0;
      for (int64_t t = 0; t < total; ++t) {
        const T* go = gout + t * C + c0;
        RoIBin<T> bin;
        int64_t batch;
        for_each_sample(g, rois, off, t, bin, batch, [&](const ClampedSample<T>& s) {
          T* gb = gx + batch * HW * C + c0;
          for (int q = 0; q < 4; ++q) vec::axpy(gb + s.index[q] * C, go, s.weight[q] * bin.inv_count, n);
        });
      }
    }
  });
}

void check_batch_indices(const at::Tensor& rois, int64_t N) {
  if (rois.size(0) == 0) return;
  const auto idx = rois.select(1, 0);
  const double lo = idx.min().item<double>(), hi = idx.max().item<double>();
  TORCH_CHECK_VALUE(lo >= 0 && hi < N, "deform_roi_pool: rois[:, 0] (batch index) must lie in [0, ", N,
                    "), got values in [", lo, ", ", hi, "]");
}

at::Tensor to_compute(const at::Tensor& t) {
  return (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16) ? t.to(at::kFloat) : t;
}

at::Tensor deform_roi_pool_cpu(const at::Tensor& input, const at::Tensor& rois, const OptTensor& offset,
                               int64_t pooled_height, int64_t pooled_width, double spatial_scale,
                               int64_t sampling_ratio, double gamma) {
  const auto g =
      check_deform_roi_pool(input, rois, offset, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
  check_batch_indices(rois, g.N);
  const auto x = to_compute(input).permute({0, 2, 3, 1}).contiguous();
  const auto r = to_compute(rois).contiguous();
  const auto off = offset ? OptTensor(to_compute(*offset).contiguous()) : kNullopt;
  auto out = at::zeros({g.R, g.PH, g.PW, g.C}, x.options());
  if (out.numel() > 0 && g.H > 0 && g.W > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_roi_pool_cpu", [&] {
      forward_kernel<scalar_t>(x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(),
                               off ? off->data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), g);
    });
  }
  return out.permute({0, 3, 1, 2}).contiguous().to(input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> deform_roi_pool_backward_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                                                const at::Tensor& rois, const OptTensor& offset,
                                                                int64_t pooled_height, int64_t pooled_width,
                                                                double spatial_scale, int64_t sampling_ratio,
                                                                double gamma) {
  const auto g =
      check_deform_roi_pool(input, rois, offset, pooled_height, pooled_width, spatial_scale, sampling_ratio, gamma);
  check_deform_roi_pool_grad(grad_output, input, g);
  check_batch_indices(rois, g.N);
  const auto x = to_compute(input).permute({0, 2, 3, 1}).contiguous();
  const auto r = to_compute(rois).contiguous();
  const auto off = offset ? OptTensor(to_compute(*offset).contiguous()) : kNullopt;
  const auto go = to_compute(grad_output).permute({0, 2, 3, 1}).contiguous();
  auto gx = at::zeros({g.N, g.H, g.W, g.C}, x.options());
  auto goff = offset ? at::zeros(offset->sizes(), x.options()) : at::empty({0}, input.options());
  if (go.numel() > 0 && g.H > 0 && g.W > 0) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_roi_pool_backward_cpu", [&] {
      const scalar_t* offp = off ? off->data_ptr<scalar_t>() : nullptr;
      input_grad_kernel<scalar_t>(r.data_ptr<scalar_t>(), offp, go.data_ptr<scalar_t>(), gx.data_ptr<scalar_t>(), g);
      if (off) {
        offset_grad_kernel<scalar_t>(x.data_ptr<scalar_t>(), r.data_ptr<scalar_t>(), offp, go.data_ptr<scalar_t>(),
                                     goff.data_ptr<scalar_t>(), g);
      }
    });
  }
  return {gx.permute({0, 3, 1, 2}).contiguous().to(input.scalar_type()), goff.to(input.scalar_type())};
}

}  // namespace
}  // namespace mmdcnv2

TORCH_LIBRARY_IMPL(mmdcnv2, CPU, m) {
  m.impl("deform_roi_pool", &mmdcnv2::deform_roi_pool_cpu);
  m.impl("deform_roi_pool_backward", &mmdcnv2::deform_roi_pool_backward_cpu);
}
