// CPU kernels of the deformable convolution: channels-last sampling, all cores
// (at::parallel_for), no atomics. float16/bfloat16 run in float32 and are cast back.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../../common/bilinear.h"
#include "../../common/cpu_vec.h"
#include "../deform_conv.h"

namespace mmdcnv2 {
namespace {

// Calls fn(group, c_begin, c_end) for the channel runs of deform group dg that lie in one conv group.
template <typename F>
inline void for_each_run(const DeformConvGeom& g, int64_t c_begin, int64_t c_end, F&& fn) {
  const int64_t Cg = g.Cg();
  for (int64_t c = c_begin; c < c_end;) {
    const int64_t gi = c / Cg;
    const int64_t e = std::min(c_end, (gi + 1) * Cg);
    fn(gi, c, e);
    c = e;
  }
}

// The sample of output row r (image i, position p), deform group dg, kernel tap k; m is the mask value.
// Rows per parallel task: enough work (about 32K channel samples) to pay for the hand-off.
inline int64_t row_grain(const DeformConvGeom& g) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, g.K() * g.C));
}

template <typename T>
struct TapSample {
  BilinearSample<T> s;
  T m;
  int64_t off_y;  // index of the dy offset of this tap in the block's offset tensor
};

template <typename T>
inline TapSample<T> tap_sample(const DeformConvGeom& g, const T* off, const T* msk, int64_t i, int64_t p, int64_t dg,
                               int64_t k) {
  const int64_t K = g.K(), P = g.P();
  const int64_t ho = p / g.Wo, wo = p % g.Wo, ki = k / g.kw, kj = k % g.kw;
  TapSample<T> t;
  t.off_y = ((i * g.dgroups + dg) * K + k) * 2 * P + p;
  const T y = static_cast<T>(ho * g.sh - g.ph + ki * g.dh) + off[t.off_y];
  const T x = static_cast<T>(wo * g.sw - g.pw + kj * g.dw) + off[t.off_y + P];
  t.m = msk ? msk[((i * g.dgroups + dg) * K + k) * P + p] : T(1);
  t.s = bilinear_sample<T>(y, x, g.H, g.W);
  return t;
}

template <typename T>
void im2col(const T* x, const T* off, const T* msk, T* cols, const DeformConvGeom& g, int64_t row0, int64_t row1) {
  const int64_t K = g.K(), P = g.P(), C = g.C, Cg = g.Cg(), Cdg = g.Cdg(), HW = g.H * g.W;
  at::parallel_for(row0, row1, row_grain(g), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r / P, p = r % P;
      const T* xi = x + i * HW * C;
      T* row = cols + (r - row0) * g.ldc();
      for (int64_t dg = 0; dg < g.dgroups; ++dg) {
        for (int64_t k = 0; k < K; ++k) {
          const auto t = tap_sample(g, off, msk, i, p, dg, k);
          const auto& s = t.s;
          for_each_run(g, dg * Cdg, (dg + 1) * Cdg, [&](int64_t gi, int64_t c0, int64_t c1) {
            T* dst = row + gi * K * Cg + k * Cg + (c0 - gi * Cg);
            const int64_t n = c1 - c0;
            if (s.all4) {
              vec::lerp4(dst, xi + s.index[0] * C + c0, xi + s.index[1] * C + c0, xi + s.index[2] * C + c0,
                         xi + s.index[3] * C + c0, s.weight[0] * t.m, s.weight[1] * t.m, s.weight[2] * t.m,
                         s.weight[3] * t.m, n);
              return;
            }
            std::fill(dst, dst + n, T(0));
            for (int q = 0; q < 4; ++q) {
              if (s.index[q] >= 0) vec::axpy(dst, xi + s.index[q] * C + c0, s.weight[q] * t.m, n);
            }
          });
        }
      }
    }
  });
}

// The backward's sampling pass: for each sample, the masked columns (for grad_weight, as im2col
// writes them) and the four dot products of grad_cols with its corners (for the offset and
// mask gradients) from one read of the corners.
template <typename T>
void im2col_coord_grad(const T* x, const T* off, const T* msk, const T* gcols, T* cols, T* goff, T* gmsk,
                       const DeformConvGeom& g, int64_t row0, int64_t row1) {
  const int64_t K = g.K(), P = g.P(), C = g.C, Cg = g.Cg(), Cdg = g.Cdg(), HW = g.H * g.W;
  at::parallel_for(row0, row1, row_grain(g), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r / P, p = r % P;
      const T* xi = x + i * HW * C;
      const T* grow = gcols + (r - row0) * g.ldc();
      T* crow = cols + (r - row0) * g.ldc();
      for (int64_t dg = 0; dg < g.dgroups; ++dg) {
        for (int64_t k = 0; k < K; ++k) {
          const auto t = tap_sample(g, off, msk, i, p, dg, k);
          const auto& s = t.s;
          T S[4] = {0, 0, 0, 0};
          for_each_run(g, dg * Cdg, (dg + 1) * Cdg, [&](int64_t gi, int64_t c0, int64_t c1) {
            const int64_t at = gi * K * Cg + k * Cg + (c0 - gi * Cg), n = c1 - c0;
            T* dst = crow + at;
            const T* src = grow + at;
            if (s.all4) {
              vec::lerp4_dot4(dst, src, xi + s.index[0] * C + c0, xi + s.index[1] * C + c0,
                              xi + s.index[2] * C + c0, xi + s.index[3] * C + c0, s.weight[0] * t.m,
                              s.weight[1] * t.m, s.weight[2] * t.m, s.weight[3] * t.m, S, n);
              return;
            }
            std::fill(dst, dst + n, T(0));
            for (int q = 0; q < 4; ++q) {
              if (s.index[q] < 0) continue;
              vec::axpy(dst, xi + s.index[q] * C + c0, s.weight[q] * t.m, n);
              S[q] += vec::dot(src, xi + s.index[q] * C + c0, n);
            }
          });
          T value, d_h, d_w;
          bilinear_backward(s, S, value, d_h, d_w);
          // off the map: zero gradient whatever the mask (a NaN mask must not leak in as 0 * NaN)
          goff[t.off_y] = s.inside ? t.m * d_h : T(0);
          goff[t.off_y + P] = s.inside ? t.m * d_w : T(0);
          if (gmsk) gmsk[((i * g.dgroups + dg) * K + k) * P + p] = value;
        }
      }
    }
  });
}

// grad_x is partitioned by channel: each task owns a channel slice of every pixel, so no two tasks write one address.
template <typename T>
void col2im(const T* gcols, const T* off, const T* msk, T* gx, const DeformConvGeom& g, int64_t row0, int64_t row1) {
  const int64_t K = g.K(), P = g.P(), C = g.C, Cg = g.Cg(), Cdg = g.Cdg(), HW = g.H * g.W;
  struct Task { int64_t gi, dg, c0, c1; };
  std::vector<Task> tasks;
  const int64_t threads = (row1 - row0) * K * C < (int64_t(1) << 15) ? 1 : at::get_num_threads();
  // One channel slice per thread: every task streams the whole chunk of grad_cols and recomputes
  // the sample geometry, so more (thinner) tasks only add traffic.
  const int64_t piece = std::max<int64_t>(16, (C + threads - 1) / threads);
  for (int64_t dg = 0; dg < g.dgroups; ++dg) {
    for_each_run(g, dg * Cdg, (dg + 1) * Cdg, [&](int64_t gi, int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; c += piece) tasks.push_back({gi, dg, c, std::min(c1, c + piece)});
    });
  }
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  at::parallel_for(0, ntasks, threads == 1 ? ntasks : 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ti = t0; ti < t1; ++ti) {
      const Task& task = tasks[ti];
      const int64_t n = task.c1 - task.c0;
      for (int64_t r = row0; r < row1; ++r) {
        const int64_t i = r / P, p = r % P;
        T* gxi = gx + i * HW * C + task.c0;
        const T* row = gcols + (r - row0) * g.ldc() + task.gi * K * Cg + (task.c0 - task.gi * Cg);
        for (int64_t k = 0; k < K; ++k) {
          const auto t = tap_sample(g, off, msk, i, p, task.dg, k);
          if (!t.s.inside) continue;
          const T* src = row + k * Cg;
          for (int q = 0; q < 4; ++q) {
            if (t.s.index[q] >= 0) vec::axpy(gxi + t.s.index[q] * C, src, t.s.weight[q] * t.m, n);
          }
        }
      }
    }
  });
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}
template <typename T>
T* opt_mut_ptr(std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

struct CpuKernels {
  static constexpr int64_t kColsBytes = int64_t(8) << 20;  // stays in the last-level cache for the GEMM
  static constexpr int64_t kMinRows = 2048;                 // fewer rows make MKL's GEMMs slow
  static void im2col(const at::Tensor& x, const at::Tensor& off, const std::optional<at::Tensor>& msk,
                     at::Tensor& cols, const DeformConvGeom& g, int64_t r0, int64_t r1) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_conv2d_im2col", [&] {
      mmdcnv2::im2col<scalar_t>(x.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk),
                                cols.data_ptr<scalar_t>(), g, r0, r1);
    });
  }
  static void col2im(const at::Tensor& gcols, const at::Tensor& off, const std::optional<at::Tensor>& msk,
                     at::Tensor& gx, const DeformConvGeom& g, int64_t r0, int64_t r1) {
    AT_DISPATCH_FLOATING_TYPES(gcols.scalar_type(), "deform_conv2d_col2im", [&] {
      mmdcnv2::col2im<scalar_t>(gcols.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk),
                                gx.data_ptr<scalar_t>(), g, r0, r1);
    });
  }
  static void im2col_coord_grad(const at::Tensor& x, const at::Tensor& off, const std::optional<at::Tensor>& msk,
                                const at::Tensor& gcols, at::Tensor& cols, at::Tensor& goff,
                                std::optional<at::Tensor>& gmsk, const DeformConvGeom& g, int64_t r0, int64_t r1) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_conv2d_im2col_coord_grad", [&] {
      mmdcnv2::im2col_coord_grad<scalar_t>(x.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk),
                                           gcols.data_ptr<scalar_t>(), cols.data_ptr<scalar_t>(),
                                           goff.data_ptr<scalar_t>(), opt_mut_ptr<scalar_t>(gmsk), g, r0, r1);
    });
  }
};

bool is_reduced(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}
std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

at::Tensor deform_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                             const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                             int64_t deform_groups) {
  const auto g = check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups);
  if (is_reduced(input)) {
    return deform_conv2d_forward_impl<CpuKernels>(input.to(at::kFloat), weight.to(at::kFloat), offset.to(at::kFloat),
                                                  to_float(mask), to_float(bias), g)
        .to(input.scalar_type());
  }
  return deform_conv2d_forward_impl<CpuKernels>(input, weight, offset, mask, bias, g);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  const auto g = check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups);
  check_deform_conv_grad(grad_output, input, g);
  if (is_reduced(input)) {
    const auto dt = input.scalar_type();
    auto [gi, gw, go, gm, gb] = deform_conv2d_backward_impl<CpuKernels>(
        grad_output.to(at::kFloat), input.to(at::kFloat), weight.to(at::kFloat), offset.to(at::kFloat),
        to_float(mask), to_float(bias), g, at::kFloat);
    return {gi.to(dt), gw.to(dt), go.to(dt), gm.to(dt), gb.to(dt)};
  }
  return deform_conv2d_backward_impl<CpuKernels>(grad_output, input, weight, offset, mask, bias, g,
                                                 input.scalar_type());
}

}  // namespace
}  // namespace mmdcnv2

TORCH_LIBRARY_IMPL(mmdcnv2, CPU, m) {
  m.impl("deform_conv2d", &mmdcnv2::deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &mmdcnv2::deform_conv2d_backward_cpu);
}
