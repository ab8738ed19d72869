// CPU kernels of the deformable convolution: channels-last sampling, all cores
// (at::parallel_for), no atomics. float16/bfloat16 run in float32 and are cast back.
#include <ATen/Parallel.h>
#include <ATen/Context.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../../common/bilinear.h"
#include "../../common/cpu_gemm.h"
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

// a rounded up to a multiple of b
inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// The sample of output row r (image i, position p), deform group dg, kernel tap k; m is the mask value.
// Rows per parallel task: enough work (about 32K channel samples) to pay for the hand-off.
inline int64_t row_grain(const DeformConvGeom& g) {
  return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, g.K() * g.C));
}

// Where the column values of output row r (image r / P, position r % P), tap k and channels
// [c0, ...) of conv group gi live in a chunk's column buffer: offset = base(r) + tap(k, gi, c0).
//   rows:  cols[r - row0][gi][k][c - gi * Cg]: one row of K * C per output position (the GEMM layout);
//   image: a channels-last "column image" [kh * rows][kw * Wo][C] of the chunk's whole output rows
//          q = image * Ho + ho (q0 ...; a chunk may hold rows of several images, stacked: a row of the
//          output depends on its own kh rows only), tap (ki, kj) of output (ho, wo) at pixel
//          (kh * (q - q0) + ki, kw * wo + kj):
//          the forward GEMM is a kh x kw convolution with stride (kh, kw) over it, grad_cols its
//          backward-data (both oneDNN; faster than MKL's sgemm where MKL is slow, e.g. on AMD CPUs -
//          on this project's Intel machine the two routes are close, see use_conv_route).
struct ColLayout {
  bool image;
  int64_t row0, ldc, K, Cg, kh, kw, Wo, C, q0;
  static ColLayout rows(const DeformConvGeom& g, int64_t row0) {
    return {false, row0, g.ldc(), g.K(), g.Cg(), g.kh, g.kw, g.Wo, g.C, 0};
  }
  // row0 must start an output row (row0 % Wo == 0); the chunk may run across images
  static ColLayout image_rows(const DeformConvGeom& g, int64_t row0) {
    return {true, row0, g.ldc(), g.K(), g.Cg(), g.kh, g.kw, g.Wo, g.C, row0 / g.Wo};
  }
  int64_t base(int64_t r) const {
    if (!image) return (r - row0) * ldc;
    // r / Wo = image * Ho + ho: the chunk's output rows, one after another, images stacked
    return ((r / Wo - q0) * kh * kw * Wo + kw * (r % Wo)) * C;
  }
  int64_t tap(int64_t k, int64_t gi, int64_t c0) const {
    if (!image) return gi * K * Cg + k * Cg + (c0 - gi * Cg);
    return ((k / kw) * kw * Wo + (k % kw)) * C + c0;
  }
};

template <typename T>
struct TapSample {
  BilinearSample<T> s;
  T m;
  int64_t off_y;  // index of the dy offset of this tap in the block's offset tensor
  int64_t m_at;   // index of this tap's mask value (and of its gradient) in the block's mask tensor
};

// The same with the position p = (ho, wo) and the tap k = (ki, kj) already split (loops that step them).
template <typename T>
MMDCNV2_INLINE TapSample<T> tap_sample_at(const DeformConvGeom& g, const T* off, const T* msk, int64_t i, int64_t p,
                                          int64_t ho, int64_t wo, int64_t dg, int64_t k, int64_t ki, int64_t kj) {
  const int64_t P = g.P(), tap = (i * g.dgroups + dg) * g.K() + k;
  TapSample<T> t;
  t.off_y = tap * 2 * P + p;
  t.m_at = tap * P + p;
  const T y = static_cast<T>(ho * g.sh - g.ph + ki * g.dh) + off[t.off_y];
  const T x = static_cast<T>(wo * g.sw - g.pw + kj * g.dw) + off[t.off_y + P];
  t.m = msk ? msk[t.m_at] : T(1);
  t.s = bilinear_sample<T>(y, x, g.H, g.W);
  return t;
}
template <typename T>
inline TapSample<T> tap_sample(const DeformConvGeom& g, const T* off, const T* msk, int64_t i, int64_t p, int64_t dg,
                               int64_t k) {
  return tap_sample_at(g, off, msk, i, p, p / g.Wo, p % g.Wo, dg, k, k / g.kw, k % g.kw);
}

// The masked sample t of channels [c0, c0 + n) of an NHWC image xi (C channels per pixel) into dst.
template <typename T>
inline void sample_channels(T* dst, const T* xi, int64_t C, int64_t c0, int64_t n, const TapSample<T>& t) {
  const auto& s = t.s;
  if (s.all4) {
    vec::lerp4(dst, xi + s.index[0] * C + c0, xi + s.index[1] * C + c0, xi + s.index[2] * C + c0,
               xi + s.index[3] * C + c0, s.weight[0] * t.m, s.weight[1] * t.m, s.weight[2] * t.m, s.weight[3] * t.m, n);
    return;
  }
  std::fill(dst, dst + n, T(0));
  for (int q = 0; q < 4; ++q) {
    if (s.index[q] >= 0) vec::axpy(dst, xi + s.index[q] * C + c0, s.weight[q] * t.m, n);
  }
}

template <typename T>
void im2col(const T* x, const T* off, const T* msk, T* cols, const DeformConvGeom& g, int64_t row0, int64_t row1,
            const ColLayout& L) {
  const int64_t K = g.K(), P = g.P(), C = g.C, Cdg = g.Cdg(), HW = g.H * g.W;
  at::parallel_for(row0, row1, row_grain(g), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r / P, p = r % P;
      const T* xi = x + i * HW * C;
      T* row = cols + L.base(r);
      for (int64_t dg = 0; dg < g.dgroups; ++dg) {
        for (int64_t k = 0; k < K; ++k) {
          const auto t = tap_sample(g, off, msk, i, p, dg, k);
          for_each_run(g, dg * Cdg, (dg + 1) * Cdg, [&](int64_t gi, int64_t c0, int64_t c1) {
            sample_channels(row + L.tap(k, gi, c0), xi, C, c0, c1 - c0, t);
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
                       const DeformConvGeom& g, int64_t row0, int64_t row1, const ColLayout& GL, const ColLayout& CL) {
  const int64_t K = g.K(), P = g.P(), C = g.C, Cdg = g.Cdg(), HW = g.H * g.W;
  at::parallel_for(row0, row1, row_grain(g), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t i = r / P, p = r % P;
      const T* xi = x + i * HW * C;
      const T* grow = gcols + GL.base(r);
      T* crow = cols + CL.base(r);
      for (int64_t dg = 0; dg < g.dgroups; ++dg) {
        for (int64_t k = 0; k < K; ++k) {
          const auto t = tap_sample(g, off, msk, i, p, dg, k);
          const auto& s = t.s;
          T S[4] = {0, 0, 0, 0};
          for_each_run(g, dg * Cdg, (dg + 1) * Cdg, [&](int64_t gi, int64_t c0, int64_t c1) {
            const int64_t n = c1 - c0;
            T* dst = crow + CL.tap(k, gi, c0);
            const T* src = grow + GL.tap(k, gi, c0);
            if (s.all4) {
              vec::lerp4_dot4(dst, src, xi + s.index[0] * C + c0, xi + s.index[1] * C + c0, xi + s.index[2] * C + c0,
                              xi + s.index[3] * C + c0, s.weight[0] * t.m, s.weight[1] * t.m, s.weight[2] * t.m,
                              s.weight[3] * t.m, S, n);
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
          if (gmsk) gmsk[t.m_at] = value;
        }
      }
    }
  });
}

// One sample's share of the scatter: its corners (pixel index, -1 where off the map or not counted at all) and
// their weights times the mask, as tap_sample gives them.
template <typename T>
struct ScatterTap {
  int64_t index[4];
  T w[4];
  static ScatterTap of(const TapSample<T>& t) {
    ScatterTap st;
    for (int q = 0; q < 4; ++q) {
      st.index[q] = t.s.inside ? t.s.index[q] : -1;
      st.w[q] = t.s.weight[q] * t.m;
    }
    return st;
  }
};
// grad_x is partitioned by channel: each task owns a channel slice of every pixel, so no two tasks write one address.
// A slice is a run of at most `piece` channels within one deform group's run of one conv group.
struct ChannelSlice {
  int64_t gi, dg, c0, c1;
};
std::vector<ChannelSlice> channel_slices(const DeformConvGeom& g, int64_t piece) {
  std::vector<ChannelSlice> slices;
  for (int64_t dg = 0; dg < g.dgroups; ++dg) {
    for_each_run(g, dg * g.Cdg(), (dg + 1) * g.Cdg(), [&](int64_t gi, int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; c += piece) slices.push_back({gi, dg, c, std::min(c1, c + piece)});
    });
  }
  return slices;
}
// One channel slice per thread (whole vectors): thinner slices would only add calls per sample.
int64_t slice_piece(const DeformConvGeom& g, int64_t threads) { return round_up((g.C + threads - 1) / threads, 16); }
// Where the scatter accumulates: pixels of C channels (NHWC, npix 0), or "slice-major" for npix pixels (the block's
// images one after the other): slice [c0, c1) of pixel q at c0 * npix + q * (c1 - c0), the slices side by side from
// channel 0 (each within one deform group's run of one conv group), fixed for the whole block. Slice-major
// keeps each thread's writes in memory of its own: with the slices side by side in each pixel (NHWC), two threads
// writing their halves of the same pixels took as long as one thread writing both (2-core AMD EPYC, 2026-12-06), though
// no two write one cache line.
struct ScatterDst {
  int64_t npix = 0;
  std::vector<ChannelSlice> slices;
};
// One thread's share of col2im: rows [row0, row1) of grad_cols, every tap, into the channel slices tasks[0, ntasks) of
// grad_x (slice t of pixel q at dst[t].base + q * dst[t].stride), the slices inside the loop over rows, so that a row's
// pieces of grad_cols for all of them are read together (with 4 deform groups and a slice per deform group, the loop
// over rows per slice read each row's 128-channel pieces in two passes). Element by element, as vec::axpy: the AVX2
// copy (float and double) and the baseline give the same bits, and each value of grad_x receives its terms in the
// order rows, taps, corners whatever the slices.
template <typename T>
struct SliceDst {
  T* base;
  int64_t stride;
};
template <typename T>
MMDCNV2_INLINE void scatter_slices_body(const T* gcols, const ScatterTap<T>* taps, const ColLayout& GL,
                                        const DeformConvGeom& g, int64_t row0, int64_t row1, const ChannelSlice* tasks,
                                        const SliceDst<T>* dst, int64_t ntasks) {
  const int64_t K = g.K(), P = g.P(), HW = g.H * g.W, D = g.dgroups;
  for (int64_t r = row0; r < row1; ++r) {
    const T* row = gcols + GL.base(r);
    for (int64_t ti = 0; ti < ntasks; ++ti) {
      const ChannelSlice& task = tasks[ti];
      const int64_t n = task.c1 - task.c0, stride = dst[ti].stride;
      T* gxi = dst[ti].base + (r / P) * HW * stride;
      const ScatterTap<T>* st = taps + ((r - row0) * D + task.dg) * K;
      for (int64_t k = 0; k < K; ++k) {
        const T* a = row + GL.tap(k, task.gi, task.c0);
        for (int q = 0; q < 4; ++q) {
          if (st[k].index[q] >= 0) vec::body::axpy(gxi + st[k].index[q] * stride, a, st[k].w[q], n);
        }
      }
    }
  }
}
#if MMDCNV2_X86_DISPATCH
template <typename T>
MMDCNV2_AVX2 void scatter_slices_avx2(const T* gcols, const ScatterTap<T>* taps, const ColLayout& GL,
                                      const DeformConvGeom& g, int64_t row0, int64_t row1, const ChannelSlice* tasks,
                                      const SliceDst<T>* dst, int64_t ntasks) {
  scatter_slices_body<T>(gcols, taps, GL, g, row0, row1, tasks, dst, ntasks);
}
#endif
template <typename T>
void scatter_slices(const T* gcols, const ScatterTap<T>* taps, const ColLayout& GL, const DeformConvGeom& g,
                    int64_t row0, int64_t row1, const ChannelSlice* tasks, const SliceDst<T>* dst, int64_t ntasks) {
#if MMDCNV2_X86_DISPATCH
  if (vec::has_avx2()) return scatter_slices_avx2<T>(gcols, taps, GL, g, row0, row1, tasks, dst, ntasks);
#endif
  scatter_slices_body<T>(gcols, taps, GL, g, row0, row1, tasks, dst, ntasks);
}
// The samples' corners and weights are computed once (in parallel over rows) and shared by the tasks. Each value of
// grad_x receives its terms in the order rows, taps, corners, whatever the slices: the same bits for every
// thread count and either layout.
template <typename T>
void col2im(const T* gcols, const T* off, const T* msk, T* gx, const DeformConvGeom& g, int64_t row0, int64_t row1,
            const ColLayout& GL, const ScatterDst& dst_layout = ScatterDst()) {
  const int64_t K = g.K(), P = g.P(), C = g.C, D = g.dgroups;
  if (row1 <= row0) return;
  std::vector<ScatterTap<T>> taps((row1 - row0) * D * K);
  at::parallel_for(row0, row1, row_grain(g), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t dg = 0; dg < D; ++dg) {
        for (int64_t k = 0; k < K; ++k) {
          taps[((r - row0) * D + dg) * K + k] = ScatterTap<T>::of(tap_sample(g, off, msk, r / P, r % P, dg, k));
        }
      }
    }
  });
  const int64_t threads = (row1 - row0) * K * C < (int64_t(1) << 15) ? 1 : at::get_num_threads();
  const bool sliced = dst_layout.npix > 0;
  const auto tasks = sliced ? dst_layout.slices : channel_slices(g, slice_piece(g, threads));
  const int64_t ntasks = static_cast<int64_t>(tasks.size());
  std::vector<SliceDst<T>> dst(ntasks);  // slice t of pixel q at dst[t].base + q * dst[t].stride
  for (int64_t ti = 0; ti < ntasks; ++ti) {
    const ChannelSlice& task = tasks[ti];
    dst[ti] = sliced ? SliceDst<T>{gx + task.c0 * dst_layout.npix, task.c1 - task.c0} : SliceDst<T>{gx + task.c0, C};
  }
  at::parallel_for(0, ntasks, threads == 1 ? ntasks : 1, [&](int64_t t0, int64_t t1) {
    scatter_slices(gcols, taps.data(), GL, g, row0, row1, tasks.data() + t0, dst.data() + t0, t1 - t0);
  });
}

template <typename T>
const T* opt_ptr(const OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}
template <typename T>
T* opt_mut_ptr(OptTensor& t) {
  return t ? t->data_ptr<T>() : nullptr;
}

struct CpuKernels {
  static constexpr int64_t kColsBytes = int64_t(8) << 20;  // stays in the last-level cache for the GEMM
  static constexpr int64_t kMinRows = 2048;                // fewer rows make MKL's GEMMs slow
  // The driver's calls use the row layout; the convolution route (below) passes its own.
  static void im2col(const at::Tensor& x, const at::Tensor& off, const OptTensor& msk, at::Tensor& cols,
                     const DeformConvGeom& g, int64_t r0, int64_t r1) {
    im2col(x, off, msk, cols, g, r0, r1, ColLayout::rows(g, r0));
  }
  static void im2col(const at::Tensor& x, const at::Tensor& off, const OptTensor& msk, at::Tensor& cols,
                     const DeformConvGeom& g, int64_t r0, int64_t r1, const ColLayout& L) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_conv2d_im2col", [&] {
      mmdcnv2::im2col<scalar_t>(x.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk),
                                cols.data_ptr<scalar_t>(), g, r0, r1, L);
    });
  }
  static void col2im(const at::Tensor& gcols, const at::Tensor& off, const OptTensor& msk, at::Tensor& gx,
                     const DeformConvGeom& g, int64_t r0, int64_t r1) {
    col2im(gcols, off, msk, gx, g, r0, r1, ColLayout::rows(g, r0));
  }
  static void col2im(const at::Tensor& gcols, const at::Tensor& off, const OptTensor& msk, at::Tensor& gx,
                     const DeformConvGeom& g, int64_t r0, int64_t r1, const ColLayout& GL,
                     const ScatterDst& dst = ScatterDst()) {
    AT_DISPATCH_FLOATING_TYPES(gcols.scalar_type(), "deform_conv2d_col2im", [&] {
      mmdcnv2::col2im<scalar_t>(gcols.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk),
                                gx.data_ptr<scalar_t>(), g, r0, r1, GL, dst);
    });
  }
  static void im2col_coord_grad(const at::Tensor& x, const at::Tensor& off, const OptTensor& msk,
                                const at::Tensor& gcols, at::Tensor& cols, at::Tensor& goff, OptTensor& gmsk,
                                const DeformConvGeom& g, int64_t r0, int64_t r1) {
    im2col_coord_grad(x, off, msk, gcols, cols, goff, gmsk, g, r0, r1, ColLayout::rows(g, r0), ColLayout::rows(g, r0));
  }
  static void im2col_coord_grad(const at::Tensor& x, const at::Tensor& off, const OptTensor& msk,
                                const at::Tensor& gcols, at::Tensor& cols, at::Tensor& goff, OptTensor& gmsk,
                                const DeformConvGeom& g, int64_t r0, int64_t r1, const ColLayout& GL,
                                const ColLayout& CL) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "deform_conv2d_im2col_coord_grad", [&] {
      mmdcnv2::im2col_coord_grad<scalar_t>(x.data_ptr<scalar_t>(), off.data_ptr<scalar_t>(), opt_ptr<scalar_t>(msk),
                                           gcols.data_ptr<scalar_t>(), cols.data_ptr<scalar_t>(),
                                           goff.data_ptr<scalar_t>(), opt_mut_ptr<scalar_t>(gmsk), g, r0, r1, GL, CL);
    });
  }
};

// ---------------------------------------------------------------- the convolution route (float32)
// The forward GEMM and grad_cols = grad_out @ W go through oneDNN's convolution over a channels-last
// column image (see ColLayout): a kh x kw convolution with stride (kh, kw), and its backward-data.
// grad_weight stays an MKL GEMM over row-layout columns, which the backward's sampling pass writes: oneDNN's
// backward-weight over the column image takes 3x as long (c3 at 800x1333: 103 against 32 ms on a 2-core AMD
// EPYC, 2026-12-04).
// Chunks are whole output rows of a block's images, stacked (a chunk may cross from one image to the next).
// A channels-last input is sampled in place and its output and grad_input are written in its layout.

// 0: automatic, 1: always the GEMM route, 2: the convolution route wherever possible, 3: the tiled route wherever
// possible. For benchmarks and tests (set_cpu_route op).
std::atomic<int64_t> g_cpu_route{0};

int64_t set_cpu_route(int64_t route) {
  TORCH_CHECK_VALUE(route >= 0 && route <= 3,
                    "set_cpu_route: route must be 0 (auto), 1 (GEMM), 2 (convolution) or 3 (tiled), got ", route);
  return g_cpu_route.exchange(route);
}

enum class Route { kGemm, kConv, kTiled };

// Without the tiled route's micro-kernels (no AVX2+FMA), the automatic choice is the one measured on this
// project's 2-core Intel Xeon machine before the tiled route existed: the convolution route at ResNet's c3
// and c4 (128 and 256 channels), the GEMM route at c5 (512 channels).
constexpr int64_t kConvRouteMaxChannels = 256;

bool has_onednn() { return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn(); }

Route cpu_route_for(const at::Tensor& input) {
  const int64_t route = g_cpu_route.load(std::memory_order_relaxed);
  if (route == 1 || input.scalar_type() != at::kFloat) return Route::kGemm;  // float64: the GEMM route
  const bool tiled = gemm::isa() != gemm::kNone;
  if (route == 3 || (route == 0 && tiled)) return tiled ? Route::kTiled : Route::kGemm;
  if (!has_onednn()) return Route::kGemm;  // oneDNN has no float64 convolution
  return route == 2 || input.size(1) <= kConvRouteMaxChannels ? Route::kConv : Route::kGemm;
}

// Output rows per chunk, equal chunks over `total` output rows (a block's images, stacked): the column
// buffers of one chunk (`buffers` of them) within the budget (column_budget() where set, else
// kImageBytes), at least one output row.
constexpr int64_t kImageBytes = int64_t(16) << 20;
int64_t image_chunk_rows(const DeformConvGeom& g, int64_t element_size, int64_t buffers, int64_t total) {
  const int64_t row_bytes = std::max<int64_t>(1, g.Wo * g.ldc() * element_size * buffers);
  const int64_t budget = column_budget() > 0 ? column_budget() : std::min(kImageBytes, kMaxColumnWorkspace);
  return equal_chunk(total, budget / row_bytes);
}

// [1, C, kh * rows, kw * Wo] channels-last view of a buffer of rows * Wo * K * C elements
at::Tensor column_image(const at::Tensor& buf, const DeformConvGeom& g, int64_t rows) {
  return buf.narrow(0, 0, rows * g.Wo * g.ldc()).view({1, g.kh * rows, g.kw * g.Wo, g.C}).permute({0, 3, 1, 2});
}

// Whether the layout copies below go in 8 x 8 blocks (transpose8x8): floats, where the processor has AVX2; other
// types and processors copy value by value.
template <typename T>
inline bool transpose8x8_ok() {
  return std::is_same<T, float>::value && vec::has_avx2();
}
// Tiles of 64 pixels per parallel task of the layout copies: about 256K values (32K where the copy is in 8 x 8
// blocks, about 8 times as fast), so that a small map's copy still goes to all threads.
template <typename T>
inline int64_t transpose_grain(int64_t C) {
  return std::max<int64_t>(1, (transpose8x8_ok<T>() ? 512 : 4096) / std::max<int64_t>(1, C));
}
// dst[j * ldd + i] = src[i * lds + j] for i, j < 8: one 8 x 8 block of floats transposed in AVX2 registers.
#if MMDCNV2_X86_DISPATCH
MMDCNV2_AVX2 inline void transpose8x8(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // then pairs of pairs: columns of four rows in each 128-bit lane
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {  // the lanes of rows 0-3 and 4-7 joined
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif
template <typename T>
inline void transpose8x8(const T* src, int64_t lds, T* dst, int64_t ldd) {
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 8; ++j) dst[j * ldd + i] = src[i * lds + j];
  }
}

// dst[c * plane + p] = src[p * C + c] for pixels p < npix: channel vectors to channel planes (NHWC -> NCHW),
// in tiles of pixels that stay in L1 (contiguous writes of a tile's run of each plane), on all threads.
// ATen's copy_ takes 2-4x longer for this direction of the transpose.
template <typename T>
void pixels_to_planes(const T* src, int64_t npix, int64_t C, T* dst, int64_t plane) {
  constexpr int64_t kTile = 64;
  const int64_t tiles = (npix + kTile - 1) / kTile;
  at::parallel_for(0, tiles, transpose_grain<T>(C), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = t * kTile, n = std::min(kTile, npix - p0);
      const T* s = src + p0 * C;
      int64_t c = 0;
      if (transpose8x8_ok<T>()) {  // 8 x 8 blocks, then the pixels and channels left over one by one
        const int64_t n8 = n / 8 * 8;
        for (; c + 8 <= C; c += 8) {
          for (int64_t j = 0; j < n8; j += 8) transpose8x8(s + j * C + c, C, dst + c * plane + p0 + j, plane);
          for (int64_t cc = c; cc < c + 8; ++cc) {
            for (int64_t j = n8; j < n; ++j) dst[cc * plane + p0 + j] = s[j * C + cc];
          }
        }
      }
      for (; c < C; ++c) {
        T* d = dst + c * plane + p0;
        for (int64_t j = 0; j < n; ++j) d[j] = s[j * C + c];
      }
    }
  });
}
// One thread's piece of planes_to_pixels (below): pixels [p0, p0 + n) of the planes into rows d[(j - p0) * ldd + c],
// 64 channels at a time (also the tiled backward's gather of grad_out's rows, whose rows are padded).
template <typename T>
void planes_to_pixel_rows(const T* src, int64_t plane, int64_t p0, int64_t n, int64_t C, T* d, int64_t ldd) {
  constexpr int64_t kTile = 64;
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    const int64_t c1 = std::min(C, c0 + kTile);
    int64_t c = c0;
    if (transpose8x8_ok<T>()) {  // 8 x 8 blocks, then the pixels and channels left over one by one
      const int64_t n8 = n / 8 * 8;
      for (; c + 8 <= c1; c += 8) {
        for (int64_t j = 0; j < n8; j += 8) transpose8x8(src + c * plane + p0 + j, plane, d + j * ldd + c, ldd);
        for (int64_t j = n8; j < n; ++j) {
          for (int64_t cc = c; cc < c + 8; ++cc) d[j * ldd + cc] = src[cc * plane + p0 + j];
        }
      }
    }
    for (; c < c1; ++c) {
      const T* s = src + c * plane + p0;
      for (int64_t j = 0; j < n; ++j) d[j * ldd + c] = s[j];
    }
  }
}
// The other direction: planes (channel c's pixel j at src[c * plane + j]) into pixels dst[npix][C], in tiles of
// 64 pixels x 64 channels (16 KiB of dst, filled in L1 while each plane's run is read once). With the 8 x 8 AVX2
// blocks, ATen's copy_ of the permuted view takes 4-7x as long where the image is in L2 (AMD EPYC, 2026-12-06: 64
// channels at 32x32 14-18 us against 98-104 us, 256 channels 96-110 us against 385-418 us), and about 1.5x on
// larger images (c3's 128 channels at 100x167: 0.65-0.82 ms against 1.1-1.2 ms in the forward; c5's 512 channels
// at 25x42: 0.22-0.28 ms against 0.38-0.45 ms). Its one caller, the tiled route, runs only where AVX2 is; the
// value-by-value copy is there for other processors and types.
template <typename T>
void planes_to_pixels(const T* src, int64_t plane, int64_t npix, int64_t C, T* dst) {
  constexpr int64_t kTile = 64;
  const int64_t tiles = (npix + kTile - 1) / kTile;
  at::parallel_for(0, tiles, transpose_grain<T>(C), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t p0 = t * kTile;
      planes_to_pixel_rows(src, plane, p0, std::min(kTile, npix - p0), C, dst + p0 * C, C);
    }
  });
}

// The same for tensors: `nhwc` holds [npix][C] contiguous, `nchw` points at pixel 0 of channel 0 with plane stride.
void pixels_to_planes(const at::Tensor& nhwc, int64_t npix, int64_t C, at::Tensor& nchw, int64_t offset,
                      int64_t plane) {
  AT_DISPATCH_FLOATING_TYPES(nhwc.scalar_type(), "deform_conv2d_pixels_to_planes", [&] {
    pixels_to_planes<scalar_t>(nhwc.data_ptr<scalar_t>(), npix, C, nchw.data_ptr<scalar_t>() + offset, plane);
  });
}

// Output rows [q0, q1) (q = image * Ho + ho, images from n0 on) of a channels-last t [N, Ct, Ho, Wo], as a
// channels-last [1, Ct, q1 - q0, Wo] view; copy_rows writes such rows into a plain contiguous t, image by image.
at::Tensor cl_rows(const at::Tensor& t, int64_t n0, int64_t q0, int64_t q1) {
  return nhwc_rows(t.narrow(0, n0, t.size(0) - n0)).narrow(0, q0, q1 - q0).unsqueeze(0).permute({0, 3, 1, 2});
}
void copy_rows(at::Tensor& t, int64_t n0, int64_t q0, int64_t q1, const at::Tensor& rows) {
  const int64_t Ct = t.size(1), Ho = t.size(2), Wo = t.size(3);
  TORCH_INTERNAL_ASSERT(t.is_contiguous());
  // [1, q1 - q0, Wo, Ct] contiguous (oneDNN's result on a channels-last input already is)
  const auto src = rows.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).contiguous();
  for (int64_t q = q0; q < q1;) {  // piece by image
    const int64_t i = q / Ho, h0 = q % Ho, h1 = std::min(Ho, h0 + (q1 - q));
    pixels_to_planes(src.select(0, 0).narrow(0, q - q0, h1 - h0), (h1 - h0) * Wo, Ct, t,
                     (n0 + i) * Ct * Ho * Wo + h0 * Wo, Ho * Wo);
    q += h1 - h0;
  }
}

// Scratch memory of the tiled route (packed weight, column chunks, grad_out rows, the weight gradient's accumulator,
// channels-last copies), kept between calls in a small pool. A fresh buffer of tens of MiB comes from the system
// again whenever the allocator has given its memory back, and its first touch then pays a page fault per 4 KiB
// (2-6 ms at c5 on this project's AMD machine, at some calls and not others). A buffer returns to the pool when
// its user is done with it, unless its memory is still held elsewhere (a result that views it); the pool keeps
// at most kScratchKeep bytes, dropping the oldest first. release_cpu_scratch() empties it.
constexpr int64_t kScratchKeep = int64_t(256) << 20;
std::mutex g_scratch_mutex;
// free buffers (1-D float tensors); never destroyed, so that no buffer is freed at exit after torch's allocator
// bookkeeping is gone
std::vector<at::Tensor>& g_scratch = *new std::vector<at::Tensor>();

int64_t scratch_bytes_locked() {
  int64_t n = 0;
  for (const auto& t : g_scratch) n += t.numel() * int64_t(sizeof(float));
  return n;
}

// At least n floats of scratch, uninitialised (contents of an earlier use where it comes from the pool).
class Scratch {
 public:
  explicit Scratch(int64_t n) {
    n = std::max<int64_t>(1, n);
    {
      std::lock_guard<std::mutex> lock(g_scratch_mutex);
      // the smallest free buffer that fits, if it is not more than twice the size asked for
      int64_t best = -1;
      for (int64_t i = 0; i < int64_t(g_scratch.size()); ++i) {
        const int64_t m = g_scratch[i].numel();
        if (m >= n && m <= 2 * n && (best < 0 || m < g_scratch[best].numel())) best = i;
      }
      if (best >= 0) {
        t_ = std::move(g_scratch[best]);
        g_scratch.erase(g_scratch.begin() + best);
      }
    }
    if (!t_.defined()) t_ = fresh(n);
  }
  Scratch(Scratch&&) = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  Scratch& operator=(Scratch&&) = delete;
  ~Scratch() {
    // back to the pool only if nothing else holds the memory (views taken from it must be gone by now)
    if (!t_.defined() || t_.use_count() != 1 || t_.storage().use_count() != 1) return;
    std::lock_guard<std::mutex> lock(g_scratch_mutex);
    g_scratch.push_back(std::move(t_));
    while (scratch_bytes_locked() > kScratchKeep) g_scratch.erase(g_scratch.begin());
  }
  float* data() const { return t_.data_ptr<float>(); }
  // the first prod(sizes) floats as a contiguous tensor of that shape
  at::Tensor view(at::IntArrayRef sizes) const {
    int64_t m = 1;
    for (const auto s : sizes) m *= s;
    return t_.narrow(0, 0, m).view(sizes);
  }
  // the first rows * ld floats as a [rows][cols] tensor with row stride ld (cols <= ld)
  at::Tensor rows(int64_t rows, int64_t cols, int64_t ld) const {
    return t_.narrow(0, 0, rows * ld).view({rows, ld}).narrow(1, 0, cols);
  }

 private:
  // A new buffer of n floats, from torch's allocator (so that its memory profiler and the benchmark's peak memory
  // see it). On Linux, one of 4 MiB or more starts at a 2 MiB boundary inside a block 2 MiB larger, and its whole
  // 2 MiB pages are asked for as transparent huge pages (madvise; where the kernel has them, the first touch maps
  // them): the route's large buffers are read and written in rows and panels far apart (a row of c5's columns is
  // 18 KiB, a chunk's column panels 48 KiB apart), which on 4 KiB pages miss the TLB at nearly every row or panel.
  static at::Tensor fresh(int64_t n) {
    const auto opts = at::TensorOptions().dtype(at::kFloat);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr int64_t kHuge = int64_t(2) << 20;
    const int64_t bytes = n * int64_t(sizeof(float));
    if (bytes >= 2 * kHuge) {
      auto t = at::empty({n + kHuge / int64_t(sizeof(float))}, opts);
      const auto p = reinterpret_cast<uintptr_t>(t.data_ptr<float>());
      const uintptr_t start = (p + kHuge - 1) / kHuge * kHuge;
      madvise(reinterpret_cast<void*>(start), size_t(bytes / kHuge * kHuge), MADV_HUGEPAGE);  // a hint
      return t.narrow(0, int64_t(start - p) / int64_t(sizeof(float)), n);
    }
#endif
    return at::empty({n}, opts);
  }

  at::Tensor t_;
};

// Empties the scratch pool; returns the bytes it held.
int64_t release_cpu_scratch() {
  std::lock_guard<std::mutex> lock(g_scratch_mutex);
  const int64_t n = scratch_bytes_locked();
  g_scratch.clear();
  return n;
}

// Images [n0, n0 + b) of the input, channels-last [b][H][W][C]: the input's own memory where it is channels-last,
// else a copy into scratch (xs, which must outlive the result).
at::Tensor channels_last_block(const at::Tensor& input, int64_t n0, int64_t b, const DeformConvGeom& g,
                               std::optional<Scratch>& xs) {
  const auto blk = input.narrow(0, n0, b).permute({0, 2, 3, 1});
  if (blk.is_contiguous()) return blk;
  xs.emplace(b * g.H * g.W * g.C);
  auto x = xs->view({b, g.H, g.W, g.C});
  const auto planes = input.narrow(0, n0, b);
  if (planes.is_contiguous()) {  // the tiled route, the only caller, runs where AVX2 is: the 8 x 8 transposes
    const int64_t HW = g.H * g.W;
    for (int64_t i = 0; i < b; ++i) {
      planes_to_pixels(planes.data_ptr<float>() + i * g.C * HW, HW, HW, g.C, xs->data() + i * HW * g.C);
    }
  } else {  // inputs neither plain nor channels-last
    x.copy_(blk);
  }
  return x;
}

// A block's gradients (images [n0, n0 + b)): the offset and mask gradients, and the slice-major buffer in scratch
// (gxs, which must outlive it; zeroed) the scatter accumulates grad_input in, which grad_input_of_block then writes
// into the result: NCHW planes, or the pixels of a channels-last result. Scattered in place into channels-last
// pixels, two threads writing their halves of the same pixels took about 1.4x as long (c3 b1, AMD EPYC, 2026-12-06).
struct BlockGrads {
  at::Tensor goff;
  OptTensor gmsk;
  at::Tensor gx;
  ScatterDst dst;
};
// The slices are given (the channel-owned backward's), else one per thread as the scatter makes them.
BlockGrads block_grads(BackwardResults& res, const OptTensor& mask, const DeformConvGeom& g, int64_t n0, int64_t b,
                       std::optional<Scratch>& gxs, std::vector<ChannelSlice> slices = {}) {
  gxs.emplace(b * g.H * g.W * g.C);
  const auto gx = gxs->view({b * g.H * g.W * g.C});
  if (slices.empty()) slices = channel_slices(g, slice_piece(g, std::max(1, at::get_num_threads())));
  const ScatterDst dst{b * g.H * g.W, std::move(slices)};
  return {res.grad_offset.narrow(0, n0, b), mask ? OptTensor(res.grad_mask.narrow(0, n0, b)) : kNullopt, gx.zero_(),
          dst};
}
// The slice-major gx of a block (ScatterDst) into the NCHW grad_input, slice by slice and image by image.
void planes_of_block(const at::Tensor& gx, const ScatterDst& dst, at::Tensor& grad_input, const DeformConvGeom& g,
                     int64_t n0, int64_t b) {
  const int64_t HW = g.H * g.W;
  for (const auto& s : dst.slices) {
    const int64_t w = s.c1 - s.c0;
    for (int64_t i = 0; i < b; ++i) {
      pixels_to_planes<float>(gx.data_ptr<float>() + s.c0 * dst.npix + i * HW * w, HW, w,
                              grad_input.data_ptr<float>() + ((n0 + i) * g.C + s.c0) * HW, HW);
    }
  }
}
// The slice-major gx of a block into a channels-last grad_input (NHWC memory): each pixel's channels gathered from the
// slices, on all threads.
void pixels_of_block(const at::Tensor& gx, const ScatterDst& dst, at::Tensor& grad_input, const DeformConvGeom& g,
                     int64_t n0) {
  const auto& slices = dst.slices;
  const float* src = gx.data_ptr<float>();
  float* out = grad_input.data_ptr<float>() + n0 * g.H * g.W * g.C;
  const int64_t C = g.C, npix = dst.npix;
  at::parallel_for(0, npix, std::max<int64_t>(1, 16384 / C), [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      for (const auto& sl : slices) {
        const int64_t w = sl.c1 - sl.c0;
        std::memcpy(out + q * C + sl.c0, src + sl.c0 * npix + q * w, w * sizeof(float));
      }
    }
  });
}
void grad_input_of_block(const at::Tensor& gx, const ScatterDst& dst, at::Tensor& grad_input, const DeformConvGeom& g,
                         bool cl, int64_t n0, int64_t b) {
  if (cl) return pixels_of_block(gx, dst, grad_input, g, n0);
  planes_of_block(gx, dst, grad_input, g, n0, b);
}

at::Tensor forward_conv_route(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                              const OptTensor& mask, const OptTensor& bias, const DeformConvGeom& g) {
  const bool cl = is_channels_last(input);
  auto out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, input.options().memory_format(result_format(input)));
  if (out.numel() == 0) return out;
  const DriverSetup<CpuKernels> s(input, weight, offset, mask, g, 1);
  const auto wcl = weight.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t rows = image_chunk_rows(g, input.element_size(), 1, s.nb * g.Ho);
  auto buf = at::empty({rows * g.Wo * g.ldc()}, input.options());
  for (int64_t n0 = 0; n0 < g.N; n0 += s.nb) {
    const auto [b, x, off, msk] = s.block(input, n0);
    for (int64_t q0 = 0; q0 < b * g.Ho; q0 += rows) {
      const int64_t q1 = std::min(b * g.Ho, q0 + rows);
      auto img = column_image(buf, g, q1 - q0);
      CpuKernels::im2col(x, off, msk, img, g, q0 * g.Wo, q1 * g.Wo, ColLayout::image_rows(g, q0 * g.Wo));
      const auto o = at::convolution(img, wcl, bias, {g.kh, g.kw}, {0, 0}, {1, 1}, false, {0, 0}, g.groups);
      if (cl && g.N == b && q0 == 0 && q1 == b * g.Ho && o.is_contiguous(at::MemoryFormat::ChannelsLast)) {
        // the whole output in one convolution: its result is the output, no copy
        return o.permute({0, 2, 3, 1}).reshape({g.N, g.Ho, g.Wo, g.Cout}).permute({0, 3, 1, 2});
      }
      if (cl) {
        cl_rows(out, n0, q0, q1).copy_(o);
      } else {
        copy_rows(out, n0, q0, q1, o);
      }
    }
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_conv_route(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const OptTensor& mask, const OptTensor& bias, const DeformConvGeom& g) {
  const int64_t K = g.K(), Cg = g.Cg(), Cout_g = g.Cout_g();
  const bool cl = is_channels_last(input);
  BackwardResults res(grad_output, input, offset, mask, bias, g, input.scalar_type());
  if (res.work) {
    const DriverSetup<CpuKernels> s(input, weight, offset, mask, g, 2);
    const auto wcl = weight.contiguous(at::MemoryFormat::ChannelsLast);
    const int64_t rows = image_chunk_rows(g, input.element_size(), 2, s.nb * g.Ho);
    auto cols = at::empty({rows * g.Wo, g.ldc()}, input.options());             // row layout, for grad_weight
    const auto go_cl = grad_output.contiguous(at::MemoryFormat::ChannelsLast);  // no copy if it is already
    for (int64_t n0 = 0; n0 < g.N; n0 += s.nb) {
      const auto [b, x, off, msk] = s.block(input, n0);
      std::optional<Scratch> gxs;
      auto [goff, gmsk, gx, dst] = block_grads(res, mask, g, n0, b, gxs);
      for (int64_t q0 = 0; q0 < b * g.Ho; q0 += rows) {
        const int64_t q1 = std::min(b * g.Ho, q0 + rows), r0 = q0 * g.Wo, r1 = q1 * g.Wo;
        // grad_out rows of this chunk, channels-last: [1, Cout, q1 - q0, Wo] = rows x Cout in memory
        const auto go = cl_rows(go_cl, n0, q0, q1);
        // the columns' buffer stands in for the column image's shape (backward-data reads no values)
        const auto shape = column_image(cols.view({-1}), g, q1 - q0);
        auto gimg = std::get<0>(at::convolution_backward(go, shape, wcl, kNullopt, {g.kh, g.kw}, {0, 0}, {1, 1}, false,
                                                         {0, 0}, g.groups, {true, false, false}))
                        .contiguous(at::MemoryFormat::ChannelsLast);
        auto cb = cols.narrow(0, 0, r1 - r0);
        CpuKernels::im2col_coord_grad(x, off, msk, gimg, cb, goff, gmsk, g, r0, r1, ColLayout::image_rows(g, r0),
                                      ColLayout::rows(g, r0));
        const auto gor = go.permute({0, 2, 3, 1}).reshape({r1 - r0, g.Cout});  // a view: go is channels-last
        for (int64_t gi = 0; gi < g.groups; ++gi) {                            // grad_weight += grad_out^T @ cols
          auto acc = res.gw_acc[gi];
          acc.addmm_(gor.narrow(1, gi * Cout_g, Cout_g).t(), cb.narrow(1, gi * K * Cg, K * Cg));
        }
        CpuKernels::col2im(gimg, off, msk, gx, g, r0, r1, ColLayout::image_rows(g, r0), dst);
      }
      grad_input_of_block(gx, dst, res.grad_input, g, cl, n0, b);
    }
  }
  return res.finish(weight, g);
}

// ---------------------------------------------------------------- the tiled route (float32, own micro-kernels)
// An implicit GEMM: the sampled columns never go out to memory in large chunks.
//   forward: each thread takes a tile of output rows; per conv group and kernel tap it samples the tile's
//     columns of that tap (rows x Cg, in its cache) and multiplies them at once into the tile's outputs
//     (rows x Cout, in its cache) with the micro-kernels of cpu_gemm.h; the outputs go to their place in
//     the result (channels-last rows, or NCHW planes) with the bias.
//   backward: per chunk of output rows (a few MiB): (1) over sub-tiles of rows, grad_cols = grad_out @ W
//     with the micro-kernels, then the sampling pass (columns for grad_weight, offset and mask gradients);
//     (2) over channel slices, the scatter of grad_cols into grad_input (no atomics, as in the other routes);
//     (3) over column panels, grad_weight += grad_out^T @ columns. That is the row split; where the channels
//     come in blocks (owned_slices), each thread instead takes its own channels through all three phases.
// Every value is one chain of fused multiply-adds in a fixed order (cpu_gemm.h), and every scatter runs in
// row order: results are bit-identical whatever the tile and chunk sizes and the number of threads. The
// sizes are therefore free to be chosen by measurement: the first call of a shape times a few candidates
// on its own data (the result is the same with any) and keeps the fastest for the process.

// Where the backward's sampling pass puts the columns for the grad_weight product. Element j of a conv group's
// columns in chunk row `row` goes to base + (gi * npan + j / np) * stride + row * ld + j % np:
// - rows (np = K * Cg, npan = 1, stride = K * Cg, ld the row stride): each row's columns side by side, as the
//   forward's tiles hold them;
// - panels (np = NR, the micro-kernel's columns, ld = NR): panel q of a group holds columns [q * NR, q * NR + NR) of
//   every row of the chunk, so that the product reads a panel in order, as it reads the packed weight, instead of NR
//   values from each of several hundred rows 18 KiB apart (c5); the sampling pass then writes each row a piece per
//   panel.
// The sampling pass computes a run of channels straight into place where all four corners are on the map, else into
// `run` (the calling thread's buffer of a conv group's channels), and puts it there.
template <typename T>
struct ColPanels {
  T* base;
  int64_t npan, stride, np, ld;
  bool panels;
  T* run;
  static ColPanels rows(T* base, int64_t KCg, int64_t ldc) { return {base, 1, KCg, KCg, ldc, false, nullptr}; }
  static ColPanels in_panels(T* base, int64_t npan, int64_t stride, int64_t NR) {
    return {base, npan, stride, NR, NR, true, nullptr};
  }
  T* row(int64_t gi, int64_t r) const { return base + gi * npan * stride + r * ld; }
  // column j of conv group gi in the chunk's first row (the grad_weight product's B, with row stride ld)
  T* at(int64_t gi, int64_t j) const { return row(gi, 0) + (j / np) * stride + j % np; }
  // in panels, the places written are prefetched two rows ahead (vec::body::lerp4_dot4_panels)
  int64_t ahead() const { return panels ? 2 * ld : 0; }
  // columns [j, j + n) of conv group gi in chunk row r
  MMDCNV2_INLINE void put(const T* v, int64_t gi, int64_t j, int64_t n, int64_t r) const {
    T* d0 = row(gi, r);
    for (int64_t q = j / np, jj = j - q * np; n > 0; ++q, jj = 0) {
      const int64_t m = std::min(n, np - jj);
      std::memcpy(d0 + q * stride + jj, v, m * sizeof(T));
      v += m, n -= m;
    }
  }
};

// Output row r's image i and position p = (ho, wo), stepped row by row (no divisions per row).
struct RowCursor {
  int64_t i, p, ho, wo;
  RowCursor(const DeformConvGeom& g, int64_t r) : i(r / g.P()), p(r % g.P()), ho(p / g.Wo), wo(p % g.Wo) {}
  MMDCNV2_INLINE void next(const DeformConvGeom& g) {
    if (++p == g.P()) {
      p = ho = wo = 0;
      ++i;
    } else if (++wo == g.Wo) {
      wo = 0;
      ++ho;
    }
  }
};

// The columns of tap k for the rows [r0, r1) and channels [c0, c1) of one conv group, into dst (row stride ld): the
// values of tap_sample and sample_channels per row and deform group run (the same operations, so the same bits as
// im2col), with each row's image and position stepped instead of divided and the channel loops inlined, compiled
// for the micro-kernels' ISA (element by element, every multiply-add fused in both copies: the same bits for both).
template <typename T>
MMDCNV2_INLINE void sample_tap_rows_body(const DeformConvGeom& g, const T* x, const T* off, const T* msk, int64_t r0,
                                         int64_t r1, int64_t k, int64_t c0, int64_t c1, T* dst, int64_t ld) {
  const int64_t C = g.C, Cdg = g.Cdg(), HWC = g.H * g.W * g.C;
  const int64_t ki = k / g.kw, kj = k % g.kw;
  RowCursor row(g, r0);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xi = x + row.i * HWC;
    T* d = dst + (r - r0) * ld;
    for (int64_t c = c0; c < c1;) {
      const int64_t dg = c / Cdg, e = std::min(c1, (dg + 1) * Cdg), n = e - c;
      const auto t = tap_sample_at(g, off, msk, row.i, row.p, row.ho, row.wo, dg, k, ki, kj);
      const auto& s = t.s;
      const T m = t.m;
      if (s.all4) {
        vec::body::lerp4(d + (c - c0), xi + s.index[0] * C + c, xi + s.index[1] * C + c, xi + s.index[2] * C + c,
                         xi + s.index[3] * C + c, s.weight[0] * m, s.weight[1] * m, s.weight[2] * m, s.weight[3] * m,
                         n);
      } else {
        for (int64_t j = 0; j < n; ++j) d[c - c0 + j] = T(0);
        for (int q = 0; q < 4; ++q) {
          if (s.index[q] >= 0) vec::body::axpy(d + (c - c0), xi + s.index[q] * C + c, s.weight[q] * m, n);
        }
      }
      c = e;
    }
    row.next(g);
  }
}
#if MMDCNV2_X86_DISPATCH
// with FMA: -mavx512f alone fuses the 512-bit loops' multiply-adds but not those of the 256-bit and 128-bit loops
// that finish a run, whose values would then differ in the last bits from the AVX2 copy's and im2col's
__attribute__((target("avx512f,fma"))) void sample_tap_rows_avx512(const DeformConvGeom& g, const float* x,
                                                                   const float* off, const float* msk, int64_t r0,
                                                                   int64_t r1, int64_t k, int64_t c0, int64_t c1,
                                                                   float* dst, int64_t ld) {
  sample_tap_rows_body<float>(g, x, off, msk, r0, r1, k, c0, c1, dst, ld);
}
MMDCNV2_AVX2 void sample_tap_rows_avx2(const DeformConvGeom& g, const float* x, const float* off, const float* msk,
                                       int64_t r0, int64_t r1, int64_t k, int64_t c0, int64_t c1, float* dst,
                                       int64_t ld) {
  sample_tap_rows_body<float>(g, x, off, msk, r0, r1, k, c0, c1, dst, ld);
}
#endif
void sample_tap_rows(int v, const DeformConvGeom& g, const float* x, const float* off, const float* msk, int64_t r0,
                     int64_t r1, int64_t k, int64_t c0, int64_t c1, float* dst, int64_t ld) {
#if MMDCNV2_X86_DISPATCH
  if (v == gemm::kAvx512) return sample_tap_rows_avx512(g, x, off, msk, r0, r1, k, c0, c1, dst, ld);
  if (v == gemm::kAvx2) return sample_tap_rows_avx2(g, x, off, msk, r0, r1, k, c0, c1, dst, ld);
#endif
  sample_tap_rows_body<float>(g, x, off, msk, r0, r1, k, c0, c1, dst, ld);
}

// The offset and mask gradients of a sample need S[q], the sum over its deform group's channels of grad_cols times
// corner q. Where the channels of each deform group come in whole blocks of kSumBlock (one conv group), every block's
// sum starts from zero and the blocks' sums are added in channel order, whichever thread computed them: the
// channel-owned backward (below) splits a row's channels between threads and adds their block sums afterwards, and the
// row-split backward adds the same sums in the same order, so both give the same bits. Other shapes keep one chain
// per run of channels (they only ever take the row split).
constexpr int64_t kSumBlock = 64;
inline bool sums_in_blocks(const DeformConvGeom& g) { return g.groups == 1 && g.Cdg() % kSumBlock == 0; }

// One run of n channels [c, c + n) of sample t for the tiled backward's sampling pass: its masked columns into place
// (column col of conv group gi, row rr of the chunk's columns) and its four dot products with grad_cols (src) added
// to S.
template <typename T>
MMDCNV2_INLINE void coord_grad_run(const TapSample<T>& t, const T* xi, int64_t C, int64_t c, int64_t n, const T* src,
                                   const ColPanels<T>& cols, int64_t gi, int64_t col, int64_t rr, T S[4]) {
  const auto& s = t.s;
  const T m = t.m;
  if (s.all4) {
    vec::body::lerp4_dot4_panels(cols.row(gi, rr), col, cols.np, cols.stride, cols.ahead(), src,
                                 xi + s.index[0] * C + c, xi + s.index[1] * C + c, xi + s.index[2] * C + c,
                                 xi + s.index[3] * C + c, s.weight[0] * m, s.weight[1] * m, s.weight[2] * m,
                                 s.weight[3] * m, S, n);
  } else {  // into the thread's run buffer, then into place
    T* dst = cols.run;
    for (int64_t j = 0; j < n; ++j) dst[j] = T(0);
    for (int q = 0; q < 4; ++q) {
      if (s.index[q] < 0) continue;
      vec::body::axpy(dst, xi + s.index[q] * C + c, s.weight[q] * m, n);
      S[q] += vec::body::dot(src, xi + s.index[q] * C + c, n);
    }
    cols.put(dst, gi, col, n, rr);
  }
}
// The offset and mask gradients of sample t from its sums S.
template <typename T>
MMDCNV2_INLINE void coord_grad_finish(const DeformConvGeom& g, const TapSample<T>& t, const T S[4], T* goff, T* gmsk) {
  T value, d_h, d_w;
  bilinear_backward(t.s, S, value, d_h, d_w);
  goff[t.off_y] = t.s.inside ? t.m * d_h : T(0);  // off the map: zero gradient whatever the mask
  goff[t.off_y + g.P()] = t.s.inside ? t.m * d_w : T(0);
  if (gmsk) gmsk[t.m_at] = value;
}

// The tiled backward's sampling pass over rows [r0, r1) (row0: the chunk's first row): what im2col_coord_grad
// computes in the row layout with row stride ldc, with each row's image and position stepped instead of divided and
// the channel loops inlined, compiled for AVX2. The sums over channels for the offset and mask gradients may be
// vectorized in another order than im2col_coord_grad's (last bits of those two gradients differ from the other
// routes); every row goes through this one function (or the channel-owned pass and coord_grad_sums, which add the
// same block sums), so the route stays bit-reproducible.
template <typename T>
MMDCNV2_INLINE void coord_grad_rows_body(const DeformConvGeom& g, const T* x, const T* off, const T* msk,
                                         const T* gcols, const ColPanels<T>& cols, T* goff, T* gmsk, int64_t row0,
                                         int64_t ldc, int64_t r0, int64_t r1) {
  const int64_t K = g.K(), C = g.C, Cdg = g.Cdg(), Cg = g.Cg(), HWC = g.H * g.W * g.C;
  const bool blocks = sums_in_blocks(g);
  RowCursor row(g, r0);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xi = x + row.i * HWC;
    const T* grow = gcols + (r - row0) * ldc;
    for (int64_t k = 0, ki = 0, kj = 0; k < K; ++k) {
      for (int64_t dg = 0; dg < g.dgroups; ++dg) {  // a tap's deform groups side by side in grad_cols and the columns
        const auto t = tap_sample_at(g, off, msk, row.i, row.p, row.ho, row.wo, dg, k, ki, kj);
        T S[4] = {0, 0, 0, 0};
        if (blocks) {  // one conv group: column k * C + c
          for (int64_t c = dg * Cdg, c_end = c + Cdg; c < c_end; c += kSumBlock) {
            T Sb[4] = {0, 0, 0, 0};
            coord_grad_run(t, xi, C, c, kSumBlock, grow + k * C + c, cols, 0, k * C + c, r - row0, Sb);
            for (int q = 0; q < 4; ++q) S[q] += Sb[q];
          }
        } else {
          for (int64_t c = dg * Cdg, c_end = (dg + 1) * Cdg; c < c_end;) {  // the deform group's runs per conv group
            const int64_t gi = c / Cg, e = std::min(c_end, (gi + 1) * Cg), n = e - c;
            const int64_t col = k * Cg + (c - gi * Cg);  // the run's first column in its conv group
            coord_grad_run(t, xi, C, c, n, grow + gi * K * Cg + col, cols, gi, col, r - row0, S);
            c = e;
          }
        }
        coord_grad_finish(g, t, S, goff, gmsk);
      }
      if (++kj == g.kw) kj = 0, ++ki;
    }
    row.next(g);
  }
}
#if MMDCNV2_X86_DISPATCH
MMDCNV2_AVX2 void coord_grad_rows_avx2(const DeformConvGeom& g, const float* x, const float* off, const float* msk,
                                       const float* gcols, const ColPanels<float>& cols, float* goff, float* gmsk,
                                       int64_t row0, int64_t ldc, int64_t r0, int64_t r1) {
  coord_grad_rows_body<float>(g, x, off, msk, gcols, cols, goff, gmsk, row0, ldc, r0, r1);
}
#endif
void coord_grad_rows(const DeformConvGeom& g, const float* x, const float* off, const float* msk, const float* gcols,
                     const ColPanels<float>& cols, float* goff, float* gmsk, int64_t row0, int64_t ldc, int64_t r0,
                     int64_t r1) {
#if MMDCNV2_X86_DISPATCH
  if (vec::has_avx2()) return coord_grad_rows_avx2(g, x, off, msk, gcols, cols, goff, gmsk, row0, ldc, r0, r1);
#endif
  coord_grad_rows_body<float>(g, x, off, msk, gcols, cols, goff, gmsk, row0, ldc, r0, r1);
}

// The channel-owned backward's slice of the channels: [c0, c1), whole blocks of kSumBlock (sums_in_blocks), its
// grad_cols and columns compact (column k * (c1 - c0) + c - c0).
struct OwnedSlice {
  int64_t c0, c1;
  int64_t width() const { return c1 - c0; }
};
// The sampling pass of slice `sl` over rows [r0, r1) (row0: the chunk's first row; rows count from the block's
// first): its columns, each block's four sums into sums[(r * K + k) * (C / kSumBlock) + c / kSumBlock] (four values
// each), and the scatter's corners and weights of its deform groups' samples into taps[((r - row0) * D + dg) * K + k].
template <typename T>
MMDCNV2_INLINE void coord_grad_owned_body(const DeformConvGeom& g, const T* x, const T* off, const T* msk,
                                          const T* gcols, int64_t ldc, const ColPanels<T>& cols, T* sums,
                                          ScatterTap<T>* taps, OwnedSlice sl, int64_t row0, int64_t r0, int64_t r1) {
  const int64_t K = g.K(), C = g.C, Cdg = g.Cdg(), D = g.dgroups, HWC = g.H * g.W * g.C, w = sl.width();
  const int64_t nblk = C / kSumBlock, dg0 = sl.c0 / Cdg, dg1 = (sl.c1 - 1) / Cdg + 1;
  RowCursor row(g, r0);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xi = x + row.i * HWC;
    const T* grow = gcols + (r - row0) * ldc;
    for (int64_t k = 0, ki = 0, kj = 0; k < K; ++k) {
      for (int64_t dg = dg0; dg < dg1; ++dg) {
        const auto t = tap_sample_at(g, off, msk, row.i, row.p, row.ho, row.wo, dg, k, ki, kj);
        taps[((r - row0) * D + dg) * K + k] = ScatterTap<T>::of(t);
        for (int64_t c = std::max(sl.c0, dg * Cdg), c_end = std::min(sl.c1, (dg + 1) * Cdg); c < c_end;
             c += kSumBlock) {
          T* Sb = sums + ((r * K + k) * nblk + c / kSumBlock) * 4;
          for (int q = 0; q < 4; ++q) Sb[q] = T(0);
          const int64_t col = k * w + (c - sl.c0);
          coord_grad_run(t, xi, C, c, kSumBlock, grow + col, cols, 0, col, r - row0, Sb);
        }
      }
      if (++kj == g.kw) kj = 0, ++ki;
    }
    row.next(g);
  }
}
// The offset and mask gradients of rows [r0, r1) from the block sums of coord_grad_owned, added in channel order.
template <typename T>
MMDCNV2_INLINE void coord_grad_sums_body(const DeformConvGeom& g, const T* off, const T* msk, const T* sums, T* goff,
                                         T* gmsk, int64_t r0, int64_t r1) {
  const int64_t K = g.K(), Cdg = g.Cdg(), nblk = g.C / kSumBlock, per_dg = Cdg / kSumBlock;
  RowCursor row(g, r0);
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t k = 0, ki = 0, kj = 0; k < K; ++k) {
      for (int64_t dg = 0; dg < g.dgroups; ++dg) {
        const auto t = tap_sample_at(g, off, msk, row.i, row.p, row.ho, row.wo, dg, k, ki, kj);
        T S[4] = {0, 0, 0, 0};
        const T* Sb = sums + ((r * K + k) * nblk + dg * per_dg) * 4;
        for (int64_t b = 0; b < per_dg; ++b) {
          for (int q = 0; q < 4; ++q) S[q] += Sb[b * 4 + q];
        }
        coord_grad_finish(g, t, S, goff, gmsk);
      }
      if (++kj == g.kw) kj = 0, ++ki;
    }
    row.next(g);
  }
}
#if MMDCNV2_X86_DISPATCH
MMDCNV2_AVX2 void coord_grad_owned_avx2(const DeformConvGeom& g, const float* x, const float* off, const float* msk,
                                        const float* gcols, int64_t ldc, const ColPanels<float>& cols, float* sums,
                                        ScatterTap<float>* taps, OwnedSlice sl, int64_t row0, int64_t r0, int64_t r1) {
  coord_grad_owned_body<float>(g, x, off, msk, gcols, ldc, cols, sums, taps, sl, row0, r0, r1);
}
MMDCNV2_AVX2 void coord_grad_sums_avx2(const DeformConvGeom& g, const float* off, const float* msk, const float* sums,
                                       float* goff, float* gmsk, int64_t r0, int64_t r1) {
  coord_grad_sums_body<float>(g, off, msk, sums, goff, gmsk, r0, r1);
}
#endif
void coord_grad_owned(const DeformConvGeom& g, const float* x, const float* off, const float* msk, const float* gcols,
                      int64_t ldc, const ColPanels<float>& cols, float* sums, ScatterTap<float>* taps, OwnedSlice sl,
                      int64_t row0, int64_t r0, int64_t r1) {
#if MMDCNV2_X86_DISPATCH
  if (vec::has_avx2()) return coord_grad_owned_avx2(g, x, off, msk, gcols, ldc, cols, sums, taps, sl, row0, r0, r1);
#endif
  coord_grad_owned_body<float>(g, x, off, msk, gcols, ldc, cols, sums, taps, sl, row0, r0, r1);
}
void coord_grad_sums(const DeformConvGeom& g, const float* off, const float* msk, const float* sums, float* goff,
                     float* gmsk, int64_t r0, int64_t r1) {
#if MMDCNV2_X86_DISPATCH
  if (vec::has_avx2()) return coord_grad_sums_avx2(g, off, msk, sums, goff, gmsk, r0, r1);
#endif
  coord_grad_sums_body<float>(g, off, msk, sums, goff, gmsk, r0, r1);
}

// Taps sampled side by side for one product of the forward: up to 512 channel samples per row, so that a conv group
// of few channels still gives the micro-kernels a deep product (fewer passes over a tile's outputs). Measured on the
// 2-core AMD EPYC (2026-12-06): products 6-8% faster with 64 channels, 1-2% with 128 and 256; a depth of 1024
// gained nothing more. A product's chain of multiply-adds runs over taps and channels in the same order either
// way: the same bits.
int64_t forward_taps(const DeformConvGeom& g) {
  return std::max<int64_t>(1, std::min<int64_t>(g.K(), 512 / std::max<int64_t>(1, g.Cg())));
}
// Forward tile rows for a budget of bytes (its sampled columns of the taps of one product, and its outputs).
int64_t forward_tile_rows(const DeformConvGeom& g, int64_t bytes) {
  return std::max<int64_t>(1, bytes / (int64_t(sizeof(float)) * (forward_taps(g) * g.Cg() + g.Cout)));
}
// Backward chunk rows for a budget of bytes (grad_cols, columns and grad_out rows).
int64_t backward_chunk_rows(const DeformConvGeom& g, int64_t bytes) {
  return std::max<int64_t>(1, bytes / (int64_t(sizeof(float)) * (2 * g.ldc() + g.Cout)));
}
// Backward chunk rows measured: a few hundred rows whatever the channels. grad_weight's accumulator is read and
// written once per chunk, so a chunk needs that many rows to keep the product ahead of the memory traffic
// (at ResNet's c5, 512 channels, the accumulator is 9 MiB); capped at the workspace limit.
int64_t backward_chunk_rows_fixed(const DeformConvGeom& g, int64_t rows) {
  const int64_t cap = kMaxColumnWorkspace / (int64_t(sizeof(float)) * (2 * g.ldc() + g.Cout));
  return std::max<int64_t>(1, std::min({rows, cap, g.N * g.P()}));
}

// Phase timers of the tiled route for tools/profile_cpu.py: thread time (nanoseconds, summed over threads) per
// phase, counted only while set_cpu_profile(true) is on (one steady_clock read per phase and tile otherwise
// skipped). Phases: forward sampling, forward products, forward output writes; backward grad_cols products,
// sampling pass (columns, offset and mask gradients), grad_weight products, grad_input scatter; outside the
// parallel loops of both: the rest of the setup (allocation, zeroing), the weight's packing, the layout copies
// (the input to channels-last, grad_input back to planes) and the weight gradient into the weight's layout.
enum Phase {
  kFwdSample,
  kFwdGemm,
  kFwdWrite,
  kBwdGemmCols,
  kBwdSample,
  kBwdGemmWeight,
  kBwdScatter,
  kSetup,
  kPack,
  kLayout,
  kWeightLayout,
  kPhases
};
std::atomic<bool> g_profile{false};
std::atomic<int64_t> g_phase_ns[kPhases];

struct PhaseTimer {
  bool on = g_profile.load(std::memory_order_relaxed);
  std::chrono::steady_clock::time_point t =
      on ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point();
  // adds the time since the last lap (or the start) to phase ph, times `threads` for a lap that timed a parallel
  // loop from outside it (thread time is what the phases count)
  void lap(Phase ph, int64_t threads = 1) {
    if (!on) return;
    const auto now = std::chrono::steady_clock::now();
    g_phase_ns[ph].fetch_add(threads * std::chrono::duration_cast<std::chrono::nanoseconds>(now - t).count(),
                             std::memory_order_relaxed);
    t = now;
  }
};

bool set_cpu_profile(bool on) {
  if (on) {
    for (auto& c : g_phase_ns) c.store(0);
  }
  return g_profile.exchange(on);
}
std::vector<int64_t> cpu_profile() {
  std::vector<int64_t> r;
  for (auto& c : g_phase_ns) r.push_back(c.load());
  return r;
}

// The weight [Cout, Cg, kh, kw] in panels of NR columns for the micro-kernels, in one parallel pass:
// [groups][ceil(cols / NR)][rows][NR], columns past the last zero, with (within a conv group)
//   forward (for_grad_cols false): rows p = (k, c), columns j = output channel;
//   backward (true):               rows p = output channel, columns j = (k, c).
// Both read the weight in its memory order, so that its lines are used whole while they are in L1: the forward a
// panel's NR weight rows 16 values (c, k) at a time, in 8 x 8 blocks where the processor has AVX2; the backward one
// output channel's run of NR input channels for every tap (the K panels of a channel block filled together, a whole
// panel row at a time, since the K panels' rows share cache sets). At c5 (a 9.4 MiB weight, 2-core AMD EPYC,
// 2026-12-06) the forward's packing takes 1.1-1.7 ms where a loop over each tap's values across all channels took
// 1.5-2.1 ms; the backward's 0.9-1.6 ms against 1.1-1.6 ms.
Scratch pack_weight_panels(const at::Tensor& weight, const DeformConvGeom& g, int64_t NR, bool for_grad_cols) {
  const int64_t K = g.K(), Cg = g.Cg(), Cout_g = g.Cout_g(), KCg = K * Cg;
  const int64_t rows = for_grad_cols ? Cout_g : KCg, cols = for_grad_cols ? KCg : Cout_g;
  const int64_t npan = (cols + NR - 1) / NR;
  const auto w = weight.contiguous();  // [Cout][Cg][K]
  Scratch wp(g.groups * npan * rows * NR);
  const float* src = w.data_ptr<float>();
  float* dst = wp.data();
  if (!for_grad_cols) {
    // panel q: d[(k * Cg + c) * NR + jj] = W[q * NR + jj][c][k]
    at::parallel_for(0, g.groups * npan, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t gi = t / npan, q = t % npan, j0 = q * NR, nj = std::min(NR, cols - j0);
        const float* w_q = src + (gi * Cout_g + j0) * KCg;
        float* d = dst + t * rows * NR;
        if (transpose8x8_ok<float>() && nj == NR && NR % 8 == 0 && NR <= 64 && KCg % 16 == 0) {
          // 16 columns (c, k) of the panel's NR weight rows at a time, whole lines, in 8 x 8 blocks through tmp
          float tmp[16 * 64];
          for (int64_t m0 = 0; m0 < KCg; m0 += 16) {
            for (int64_t jb = 0; jb < NR; jb += 8) {
              transpose8x8(w_q + jb * KCg + m0, KCg, tmp + jb, NR);
              transpose8x8(w_q + jb * KCg + m0 + 8, KCg, tmp + 8 * NR + jb, NR);
            }
            for (int64_t m = m0; m < m0 + 16; ++m) {
              std::memcpy(d + ((m % K) * Cg + m / K) * NR, tmp + (m - m0) * NR, NR * sizeof(float));
            }
          }
          continue;
        }
        for (int64_t c = 0; c < Cg; ++c) {
          for (int64_t k = 0; k < K; ++k) {
            float* dr = d + (k * Cg + c) * NR;
            for (int64_t jj = 0; jj < nj; ++jj) dr[jj] = w_q[jj * KCg + c * K + k];
            for (int64_t jj = nj; jj < NR; ++jj) dr[jj] = 0.f;
          }
        }
      }
    });
    return wp;
  }
  // backward: column j = k * Cg + c; a task fills the panels of channels [c0, c0 + NR) for every tap where they are
  // whole panels (Cg a multiple of NR), else one panel of columns [j0, j0 + NR)
  const bool blocks = Cg % NR == 0;
  const int64_t per_group = blocks ? Cg / NR : npan;
  at::parallel_for(0, g.groups * per_group, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t gi = t / per_group, u = t % per_group;
      const float* w_g = src + gi * Cout_g * KCg;
      float* d_g = dst + gi * npan * rows * NR;
      if (blocks) {
        const int64_t c0 = u * NR;
        float* d_u = d_g + u * rows * NR;  // tap k's panel: d_u + k * (Cg / NR) * rows * NR
        const int64_t tap_stride = Cg / NR * rows * NR;
        for (int64_t co = 0; co < Cout_g; ++co) {
          const float* w_c = w_g + co * KCg + c0 * K;  // [NR channels][K taps], contiguous
          float* d_c = d_u + co * NR;
          for (int64_t k = 0; k < K; ++k) {  // a whole panel row at a time (the K panels' rows share cache sets)
            for (int64_t jj = 0; jj < NR; ++jj) d_c[k * tap_stride + jj] = w_c[jj * K + k];
          }
        }
      } else {
        const int64_t j0 = u * NR, nj = std::min(NR, cols - j0);
        float* d = d_g + u * rows * NR;
        int64_t col[64];  // column j's place in an output channel's weight row (NR <= 64)
        for (int64_t jj = 0; jj < nj; ++jj) col[jj] = ((j0 + jj) % Cg) * K + (j0 + jj) / Cg;
        for (int64_t co = 0; co < Cout_g; ++co) {
          for (int64_t jj = 0; jj < nj; ++jj) d[co * NR + jj] = w_g[co * KCg + col[jj]];
          for (int64_t jj = nj; jj < NR; ++jj) d[co * NR + jj] = 0.f;
        }
      }
    }
  });
  return wp;
}

// Forward tiles for a call of `total` rows: about `rows` each, as many as a multiple of the thread count, the
// micro-tiles shared out evenly (tile t: micro-tiles [t * mt / tiles, (t + 1) * mt / tiles) of the mt in all), so
// that the threads' consecutive runs of tiles differ by one micro-tile at most. (Tiles of a fixed size with a short
// last one left the two threads 510 and 540 rows at c5 b1, a 6% wait for one of them.)
struct ForwardTiles {
  int64_t total, MR, mt, tiles;
  ForwardTiles(int64_t total, int64_t rows, int64_t threads, int64_t MR)
      : total(total),
        MR(MR),
        mt((total + MR - 1) / MR),
        tiles(std::max<int64_t>(1, std::min(mt, round_up((total + rows - 1) / rows, std::max<int64_t>(1, threads))))) {}
  int64_t begin(int64_t t) const { return std::min(total, MR * (t * mt / tiles)); }
  int64_t end(int64_t t) const { return std::min(total, MR * ((t + 1) * mt / tiles)); }
  int64_t max_rows() const { return MR * ((mt + tiles - 1) / tiles); }
};

at::Tensor forward_tiled(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                         const OptTensor& mask, const OptTensor& bias, const DeformConvGeom& g, int64_t rows) {
  const int v = gemm::isa();
  const bool cl = is_channels_last(input);
  auto out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, input.options().memory_format(result_format(input)));
  if (out.numel() == 0) return out;
  PhaseTimer setup_timer;
  const DriverSetup<CpuKernels> s(input, weight, offset, mask, g, 1, false);
  const int64_t K = g.K(), Cg = g.Cg(), Cout = g.Cout, Cout_g = g.Cout_g(), P = g.P(), KCg = K * Cg;
  const int64_t NR = gemm::tile_nr(v), npan = (Cout_g + NR - 1) / NR;
  const int64_t threads = std::max(1, at::get_num_threads());
  setup_timer.lap(kSetup, threads);
  // B(p, j) = W[j][p] in panels of NR output channels: [groups][npan][K * Cg][NR]
  const auto wp = pack_weight_panels(weight, g, NR, false);
  setup_timer.lap(kPack, threads);
  const float* wpp = wp.data();
  const auto bias_c = bias ? bias->contiguous() : at::Tensor();
  const float* bp = bias ? bias_c.data_ptr<float>() : nullptr;
  const int64_t taps = forward_taps(g), lda = gemm::padded_ld(taps * Cg), ldo = gemm::padded_ld(Cout);
  float* outp = out.data_ptr<float>();
  for (int64_t n0 = 0; n0 < g.N; n0 += s.nb) {
    const int64_t b = std::min(s.nb, g.N - n0);
    std::optional<Scratch> xs;
    setup_timer.lap(kSetup, threads);
    const auto x = channels_last_block(input, n0, b, g, xs);
    setup_timer.lap(xs ? kLayout : kSetup, threads);  // a channels-last input: no copy
    const float* xp = x.data_ptr<float>();
    const float* offp = s.offset.data_ptr<float>() + n0 * s.offset.stride(0);
    const float* mp = s.mask ? s.mask->data_ptr<float>() + n0 * s.mask->stride(0) : nullptr;
    const ForwardTiles ft(b * P, rows, threads, gemm::tile_mr(v));
    const int64_t tile_pad = ft.max_rows();
    setup_timer.lap(kSetup, threads);
    at::parallel_for(0, ft.tiles, 1, [&](int64_t t0, int64_t t1) {
      // from the pool (a fresh vector of this size costs page faults and zeroing at every call); the sampled rows'
      // padding up to a whole micro-tile is zeroed below (the micro-kernels read it, and discard what it gives)
      const Scratch abuf_mem(tile_pad * lda), cbuf_mem(tile_pad * ldo);
      float* abuf = abuf_mem.data();
      float* cbuf = cbuf_mem.data();
      PhaseTimer timer;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = ft.begin(t), r1 = ft.end(t), R = r1 - r0;
        if (R <= 0) continue;
        for (int64_t gi = 0; gi < g.groups; ++gi) {
          for (int64_t k0 = 0; k0 < K; k0 += taps) {
            const int64_t nt = std::min(taps, K - k0);
            for (int64_t k = k0; k < k0 + nt; ++k) {
              sample_tap_rows(v, g, xp, offp, mp, r0, r1, k, gi * Cg, (gi + 1) * Cg, abuf + (k - k0) * Cg, lda);
            }
            for (int64_t r = R; r < round_up(R, gemm::tile_mr(v)); ++r) std::fill_n(abuf + r * lda, nt * Cg, 0.f);
            timer.lap(kFwdSample);
            gemm::gemm_packed(v, R, Cout_g, nt * Cg, abuf, lda, 1, wpp + (gi * npan * KCg + k0 * Cg) * NR, KCg * NR,
                              cbuf + gi * Cout_g, ldo, k0 > 0);
            timer.lap(kFwdGemm);
          }
        }
        if (cl) {  // rows of [N * P][Cout]
          float* o = outp + (n0 * P + r0) * Cout;
          for (int64_t r = 0; r < R; ++r) {
            const float* c = cbuf + r * ldo;
            for (int64_t co = 0; co < Cout; ++co) o[r * Cout + co] = bp ? c[co] + bp[co] : c[co];
          }
        } else {  // planes of [N][Cout][P], piece by image
          for (int64_t r = r0; r < r1;) {
            const int64_t i = r / P, p0 = r % P, n = std::min(r1 - r, P - p0);
            float* o = outp + (n0 + i) * Cout * P + p0;
            const float* c = cbuf + (r - r0) * ldo;
            for (int64_t co = 0; co < Cout; ++co) {
              const float add = bp ? bp[co] : 0.f;
              float* oc = o + co * P;
              for (int64_t j = 0; j < n; ++j) oc[j] = c[j * ldo + co] + add;
            }
            r += n;
          }
        }
        timer.lap(kFwdWrite);
      }
    });
    setup_timer = PhaseTimer();
  }
  return out;
}

// Rows [row, row + n) of grad_out (row = image * P + position) into dst (row stride ld): from rows of [N * P][Cout]
// (channels-last memory), or gathered from its planes [N][Cout][P] image by image with planes_to_pixel_rows (in 8 x 8
// blocks where the processor has AVX2: at c5 b1 the backward's grad_cols phase took 0.3-0.6 ms less thread time than
// with a gather value by value, AMD EPYC, 2026-12-07).
void grad_out_rows(const float* go, bool rows, int64_t Cout, int64_t P, int64_t row, int64_t n, float* dst,
                   int64_t ld) {
  if (rows) {
    for (int64_t a = 0; a < n; ++a) std::memcpy(dst + a * ld, go + (row + a) * Cout, Cout * sizeof(float));
    return;
  }
  for (int64_t a = 0; a < n;) {  // piece by image
    const int64_t i = (row + a) / P, p0 = (row + a) % P, m = std::min(n - a, P - p0);
    planes_to_pixel_rows(go + i * Cout * P, P, p0, m, Cout, dst + a * ld, ld);
    a += m;
  }
}

// The channel-owned backward's slices: the channels in whole blocks of kSumBlock shared out evenly between the
// threads; none where a thread would get no block or the sums are not in blocks. Each thread then takes its channels
// through every phase of every chunk (its own grad_out rows, its columns of grad_cols, its sampling pass, its share of
// grad_input, its columns of grad_weight), so that no cache line a thread writes is read by another until the offset
// gradients' block sums are added after the last chunk. Where the host puts the two threads on different last-level
// caches, the row split hands grad_cols and the columns over between the phases (see backward_tiled) and pays for it.
std::vector<OwnedSlice> owned_slices(const DeformConvGeom& g, int64_t threads) {
  const int64_t nblk = g.C / kSumBlock;
  if (!sums_in_blocks(g) || threads < 2 || nblk < threads) return {};
  std::vector<OwnedSlice> sl;
  for (int64_t t = 0; t < threads; ++t)
    sl.push_back({t * nblk / threads * kSumBlock, (t + 1) * nblk / threads * kSumBlock});
  return sl;
}
// The slices' pieces per deform group, in channel order: the layout of the block's slice-major grad_input.
std::vector<ChannelSlice> owned_pieces(const DeformConvGeom& g, const std::vector<OwnedSlice>& slices) {
  std::vector<ChannelSlice> pieces;
  for (const auto& sl : slices) {
    for (int64_t c = sl.c0; c < sl.c1;) {
      const int64_t dg = c / g.Cdg(), e = std::min(sl.c1, (dg + 1) * g.Cdg());
      pieces.push_back({0, dg, c, e});
      c = e;
    }
  }
  return pieces;
}

std::atomic<int64_t> g_channel_split_calls{0};  // backward calls that split their work by channels (tests)

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_tiled(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const OptTensor& mask, const OptTensor& bias, const DeformConvGeom& g, int64_t chunk, bool panels, bool owned) {
  const int v = gemm::isa();
  const int64_t MR = gemm::tile_mr(v), NR = gemm::tile_nr(v);
  const int64_t K = g.K(), Cg = g.Cg(), Cout = g.Cout, Cout_g = g.Cout_g(), P = g.P(), KCg = K * Cg;
  const bool cl = is_channels_last(input);
  PhaseTimer setup_timer;
  BackwardResults res(grad_output, input, offset, mask, bias, g, at::kFloat, /*own_weight_acc=*/false);
  if (!res.work) return res.finish(weight, g);
  const DriverSetup<CpuKernels> s(input, weight, offset, mask, g, 2, false);
  // B(p = co, j = (k, c)) = W[co][(k, c)] in panels of NR columns: [groups][npan][Cout_g][NR]
  const int64_t npan = (KCg + NR - 1) / NR;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const auto own = owned ? owned_slices(g, threads) : std::vector<OwnedSlice>();
  const int64_t nown = static_cast<int64_t>(own.size());
  if (nown > 0) ++g_channel_split_calls;
  setup_timer.lap(kSetup, threads);
  const auto wp = pack_weight_panels(weight, g, NR, true);
  setup_timer.lap(kPack, threads);
  const float* wpp = wp.data();
  // the weight gradient's accumulator, its rows padded (ldw) where KCg is a multiple of 64 floats: unpadded, the rows
  // of a micro-tile of it fall into a few cache sets (at c5, 18 KiB apart), and the grad_weight product, which reads
  // and writes them once per chunk, ran slower: alone on the cores 2-4% (its loop on its own), in the backward at c5
  // 0.5-1% with one deform group and 2-3% with four (the two alternating in one process; 2-core AMD EPYC, 2026-12-07)
  const int64_t ldw = gemm::padded_ld(KCg);
  Scratch gw_acc(g.groups * Cout_g * ldw);
  res.gw_acc = gw_acc.rows(g.groups * Cout_g, KCg, ldw).view({g.groups, Cout_g, KCg});
  float* gwp = gw_acc.data();
  // chunk buffers: grad_cols in the row layout with a padded row stride, the columns (ColPanels), grad_out rows
  // (+ padding); channel-owned, one set per slice, its rows only its columns
  const int64_t ldg = gemm::padded_ld(Cout);
  const int64_t chunk_pad = round_up(chunk, MR);
  // the columns in rows or in panels (ColPanels); a panel's stride off a multiple of 4 KiB, so that the panels' rows
  // of one chunk row do not share cache sets
  const int64_t cps = chunk_pad * NR + 16;
  struct Buffers {
    int64_t ldc;
    Scratch gcols, cols, gob;
    ColPanels<float> colp;
  };
  const auto buffers = [&](int64_t width) {  // for columns of `width` per conv group (KCg, or K * a slice's width)
    const int64_t ldc = gemm::padded_ld(g.groups * width), np = (width + NR - 1) / NR;
    Buffers b{ldc, Scratch(chunk_pad * ldc), Scratch(panels ? g.groups * np * cps : chunk_pad * ldc),
              Scratch(chunk_pad * ldg + MR), ColPanels<float>()};
    b.colp = panels ? ColPanels<float>::in_panels(b.cols.data(), np, cps, NR)
                    : ColPanels<float>::rows(b.cols.data(), width, ldc);
    std::fill(b.gob.data(), b.gob.data() + chunk_pad * ldg + MR, 0.f);  // the padding past Cout in each row stays zero
    return b;
  };
  std::vector<Buffers> bufs;
  if (nown == 0) bufs.push_back(buffers(KCg));
  for (const auto& sl : own) bufs.push_back(buffers(K * sl.width()));
  // grad_out rows come straight from its memory: rows of [N * P][Cout] where it is channels-last, else planes
  const bool go_rows = grad_output.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto go_mem = go_rows ? grad_output : grad_output.contiguous();
  const float* go_all = go_mem.data_ptr<float>();
  bool gw_started = false;  // the first grad_weight product writes the accumulator, the later ones add to it
  for (int64_t n0 = 0; n0 < g.N; n0 += s.nb) {
    const int64_t b = std::min(s.nb, g.N - n0);
    std::optional<Scratch> xs, gxs, sums_mem;
    setup_timer.lap(kSetup, threads);
    const auto x = channels_last_block(input, n0, b, g, xs);
    setup_timer.lap(xs ? kLayout : kSetup, threads);  // a channels-last input: no copy
    const auto off = s.offset.narrow(0, n0, b);
    const OptTensor msk = s.mask ? OptTensor(s.mask->narrow(0, n0, b)) : kNullopt;
    auto [goff, gmsk, gx, dst] = block_grads(res, mask, g, n0, b, gxs, owned_pieces(g, own));
    const float* xp = x.data_ptr<float>();
    const float* offp = off.data_ptr<float>();
    const float* mp = msk ? msk->data_ptr<float>() : nullptr;
    float* goffp = goff.data_ptr<float>();
    float* gmp = gmsk ? gmsk->data_ptr<float>() : nullptr;
    // chunks of equal size in whole micro-tiles (no short last chunk), each cut for the first phase into tasks of at
    // most 16 micro-tiles (each task streams the packed weight, or a slice's columns of it, through its product: at
    // c5, 192 rows make that product about 3% faster than 96, alone on one core), the micro-tiles shared out evenly;
    // row-split, the tasks a multiple of the thread count (the threads' task groups differ by one micro-tile at most)
    const int64_t total = b * P, step = std::min(round_up(equal_chunk(total, chunk), MR), chunk_pad);
    setup_timer.lap(kSetup, threads);
    if (nown > 0) {
      // the block sums of the offset and mask gradients, [rows][K][C / kSumBlock][4]
      sums_mem.emplace(total * K * (g.C / kSumBlock) * 4);
      float* sums = sums_mem->data();
      float* gxp = gx.data_ptr<float>();  // (a lambda may not capture a structured binding before C++20)
      const int64_t npix = dst.npix;
      const auto& slices = dst.slices;
      at::parallel_for(0, nown, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          PhaseTimer timer;
          const OwnedSlice sl = own[t];
          const int64_t w = sl.width(), Kw = K * w;
          Buffers& bu = bufs[t];
          float* gcp = bu.gcols.data();
          float* gop = bu.gob.data();
          std::vector<float> run(kSumBlock);
          auto colp = bu.colp;
          colp.run = run.data();
          std::vector<ScatterTap<float>> taps(chunk_pad * g.dgroups * K);
          std::vector<ChannelSlice> pieces;  // the block's slices in this one, channels counted from sl.c0
          std::vector<SliceDst<float>> pdst;
          for (const auto& pc : slices) {
            if (pc.c0 < sl.c0 || pc.c0 >= sl.c1) continue;
            pieces.push_back({0, pc.dg, pc.c0 - sl.c0, pc.c1 - sl.c0});
            pdst.push_back({gxp + pc.c0 * npix, pc.c1 - pc.c0});
          }
          ColLayout GL = ColLayout::rows(g, 0);  // grad_cols of the slice: row stride ldc, tap k at k * w
          GL.ldc = bu.ldc, GL.Cg = w;
          bool started = gw_started;
          for (int64_t r0 = 0; r0 < total; r0 += step) {
            const int64_t r1 = std::min(total, r0 + step), R = r1 - r0, tiles = (R + MR - 1) / MR;
            const int64_t ntask = (tiles + 15) / 16;
            // (1) grad_cols of the slice's columns for sub-tiles of rows, then their sampling pass
            for (int64_t u = 0; u < ntask; ++u) {
              const int64_t a0 = MR * (u * tiles / ntask), a1 = std::min(R, MR * ((u + 1) * tiles / ntask));
              grad_out_rows(go_all, go_rows, Cout, P, n0 * P + r0 + a0, a1 - a0, gop + a0 * ldg, ldg);
              for (int64_t k = 0; k < K; ++k) {
                gemm::gemm_packed(v, a1 - a0, w, Cout, gop + a0 * ldg, ldg, 1, wpp + (k * Cg + sl.c0) / NR * Cout * NR,
                                  Cout * NR, gcp + a0 * bu.ldc + k * w, bu.ldc, false, true);
              }
              timer.lap(kBwdGemmCols);
              coord_grad_owned(g, xp, offp, mp, gcp, bu.ldc, colp, sums, taps.data(), sl, r0, r0 + a0, r0 + a1);
              timer.lap(kBwdSample);
            }
            // (2) the slice's share of grad_input
            GL.row0 = r0;
            scatter_slices(gcp, taps.data(), GL, g, r0, r1, pieces.data(), pdst.data(),
                           static_cast<int64_t>(pieces.size()));
            timer.lap(kBwdScatter);
            // (3) the slice's columns of grad_weight (column q * NR of the slice's columns is tap q * NR / w's)
            for (int64_t j = 0; j < Kw; j += NR) {
              gemm::gemm(v, Cout, std::min(NR, Kw - j), R, gop, 1, ldg, bu.colp.at(0, j), bu.colp.ld,
                         gwp + (j / w) * Cg + sl.c0 + j % w, ldw, started, true);
            }
            timer.lap(kBwdGemmWeight);
            started = true;
          }
        }
      });
      gw_started = true;
      PhaseTimer sums_timer;
      at::parallel_for(0, total, row_grain(g),
                       [&](int64_t a, int64_t e) { coord_grad_sums(g, offp, mp, sums, goffp, gmp, a, e); });
      sums_timer.lap(kBwdSample, threads);
    } else {
      for (int64_t r0 = 0; r0 < total; r0 += step) {
        const int64_t r1 = std::min(total, r0 + step), R = r1 - r0, tiles = (R + MR - 1) / MR;
        const int64_t ldc = bufs[0].ldc;
        float* gcp = bufs[0].gcols.data();
        float* gop = bufs[0].gob.data();
        const auto& cols = bufs[0].colp;
        const auto gcols = bufs[0].gcols.view({chunk_pad, ldc});
        ColLayout L = ColLayout::rows(g, r0);
        L.ldc = ldc;
        const int64_t ntask = threads * ((tiles + threads * 16 - 1) / (threads * 16));
        // (1) grad_cols of sub-tiles of rows, then their sampling pass
        at::parallel_for(0, ntask, 1, [&](int64_t t0, int64_t t1) {
          PhaseTimer timer;
          std::vector<float> run(Cg);
          auto colp = cols;
          colp.run = run.data();
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t a0 = MR * (t * tiles / ntask), a1 = std::min(R, MR * ((t + 1) * tiles / ntask));
            if (a0 >= a1) continue;
            grad_out_rows(go_all, go_rows, Cout, P, n0 * P + r0 + a0, a1 - a0, gop + a0 * ldg, ldg);
            for (int64_t gi = 0; gi < g.groups; ++gi) {
              gemm::gemm_packed(v, a1 - a0, KCg, Cout_g, gop + a0 * ldg + gi * Cout_g, ldg, 1,
                                wpp + gi * npan * Cout_g * NR, Cout_g * NR, gcp + a0 * ldc + gi * KCg, ldc, false,
                                true);
            }
            timer.lap(kBwdGemmCols);
            coord_grad_rows(g, xp, offp, mp, gcp, colp, goffp, gmp, r0, ldc, r0 + a0, r0 + a1);
            timer.lap(kBwdSample);
          }
        });
        // (2) grad_input: the scatter of grad_cols, by channel slices (its time counts once, not per thread), while
        // grad_cols are still in the last-level cache
        PhaseTimer scatter_timer;
        CpuKernels::col2im(gcols, off, msk, gx, g, r0, r1, L, dst);
        scatter_timer.lap(kBwdScatter, threads);
        // (3) grad_weight += grad_out^T @ columns, by column panels (each value's chain runs over rows in order)
        at::parallel_for(0, g.groups * npan, 1, [&](int64_t t0, int64_t t1) {
          PhaseTimer timer;
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t gi = t / npan, j = (t % npan) * NR;
            gemm::gemm(v, Cout_g, std::min(NR, KCg - j), R, gop + gi * Cout_g, 1, ldg, cols.at(gi, j), cols.ld,
                       gwp + gi * Cout_g * ldw + j, ldw, gw_started, true);
          }
          timer.lap(kBwdGemmWeight);
        });
        gw_started = true;
      }
    }
    setup_timer = PhaseTimer();
    grad_input_of_block(gx, dst, res.grad_input, g, cl, n0, b);
    setup_timer.lap(kLayout, threads);
  }
  auto result = res.finish(weight, g);
  setup_timer.lap(kWeightLayout, threads);
  res.gw_acc.reset();  // gw_acc's memory back to the pool (unless the result views it)
  setup_timer.lap(kSetup, threads);
  return result;
}

// Tile and chunk sizes: from column_budget() where set; otherwise measured once per kind of call and kept for the
// process (the first call of a kind runs each candidate twice on its own data and keeps the fastest). A kind is the
// layer (channels, kernel, stride, dilation, groups, mask), the thread count, the micro-kernel and the number of
// output rows to within a factor of 2: the sizes depend on the channels far more than on the image, and training
// with images of varying size must not measure again at every new size.
using TileKey =
    std::tuple<int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, int>;
std::mutex g_tile_mutex;
std::map<TileKey, int64_t> g_tile_cache;

TileKey tile_key(int direction, const DeformConvGeom& g, bool masked) {
  int64_t rows_log2 = 0;
  for (int64_t rows = g.N * g.P(); rows > 1; rows >>= 1) ++rows_log2;
  return {direction,
          g.C,
          g.Cout,
          g.kh * 1000 + g.kw,
          g.sh * 1000 + g.sw,
          g.dh * 1000 + g.dw,
          g.groups,
          g.dgroups,
          rows_log2,
          at::get_num_threads(),
          masked ? 1 : 0,
          gemm::isa(),
          int(g.ph * 1000 + g.pw)};
}

// Budgets (bytes) tried by the measurement: forward tiles and backward chunks.
constexpr int64_t kForwardBudgets[] = {int64_t(128) << 10, int64_t(256) << 10, int64_t(512) << 10, int64_t(1024) << 10};
constexpr int64_t kBackwardRows[] = {192, 384, 768};

int64_t g_tile_measurements = 0;  // how many shapes were measured (tests)
constexpr int kMeasureRounds = 2;
constexpr int kVariantRounds = 3;

// The setting of a kind of call (what `rows_of` makes of a candidate, passed to `run`): each candidate's, then `then`
// of the best of them (a variant of it; -1: none), and the fastest kept.
template <typename Run, typename Rows, typename Budget, size_t n, typename Then = int64_t (*)(int64_t)>
auto run_measured(
    int direction, const DeformConvGeom& g, bool masked, const int64_t (&candidates)[n], Rows rows_of,
    Budget rows_of_budget, Run run, Then then = [](int64_t) -> int64_t { return -1; }) {
  if (column_budget() > 0) return run(rows_of_budget(column_budget()));
  const auto key = tile_key(direction, g, masked);
  {
    std::lock_guard<std::mutex> lock(g_tile_mutex);
    auto it = g_tile_cache.find(key);
    if (it != g_tile_cache.end()) return run(it->second);
  }
  int64_t best_rows = rows_of(candidates[0]);
  double best = -1;
  decltype(run(best_rows)) result;
  const auto seconds = [&](int64_t setting) {  // one timed run (its result kept: every setting gives the same)
    const auto t0 = std::chrono::steady_clock::now();
    result = run(setting);
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  // each candidate twice, in turn, its best time kept: one timing alone is at the mercy of a moment's noise
  for (int round = 0; round < kMeasureRounds; ++round) {
    int64_t last = -1;
    for (const int64_t c : candidates) {
      const int64_t rows = rows_of(c);
      if (rows == last) continue;  // candidates that come to the same size
      last = rows;
      const double dt = seconds(rows);
      if (best < 0 || dt < best) best = dt, best_rows = rows;
    }
  }
  // the variant of the best against the best, in turn, the best time of each kept
  const int64_t variant = then(best_rows);
  if (variant >= 0) {
    const int64_t first = best_rows;
    double t_first = -1, t_variant = -1;
    for (int round = 0; round < kVariantRounds; ++round) {
      for (const int64_t setting : {variant, first}) {
        const double dt = seconds(setting);
        double& t = setting == first ? t_first : t_variant;
        if (t < 0 || dt < t) t = dt;
      }
    }
    best_rows = t_variant < t_first ? variant : first;
  }
  std::lock_guard<std::mutex> lock(g_tile_mutex);
  g_tile_cache.emplace(key, best_rows);
  ++g_tile_measurements;
  return result;
}

at::Tensor forward_tiled_route(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                               const OptTensor& mask, const OptTensor& bias, const DeformConvGeom& g) {
  const auto rows_of = [&](int64_t bytes) { return forward_tile_rows(g, bytes); };
  return run_measured(0, g, mask.has_value(), kForwardBudgets, rows_of, rows_of,
                      [&](int64_t rows) { return forward_tiled(input, weight, offset, mask, bias, g, rows); });
}

// The backward's columns in rows or in panels (ColPanels): -1 as measured (below), 0 rows, 1 panels (tests).
std::atomic<int> g_col_panels{-1};
int64_t set_cpu_col_panels(int64_t mode) {
  TORCH_CHECK_VALUE(mode >= -1 && mode <= 1,
                    "set_cpu_col_panels: mode must be -1 (measured), 0 (rows) or 1 (panels), got ", mode);
  return g_col_panels.exchange(static_cast<int>(mode));
}

// How the backward shares out its work: 0 rows between the threads in every phase (tests), 1 each thread its own
// channels through all phases where owned_slices allows it (the default; the same results either way). The channel
// split is not measured against the row split: on the 2-core AMD EPYC (2026-12-07) it was as fast or faster at c3, c4
// and c5 with the two threads on one last-level cache (c3 b1 backward 67.5 against 68.7 ms, c5 53.2 against
// 55.0 ms) and far faster with them on two (c3 70.5 against 92.9 ms, c4 58.5 against 68.5, c5 57.0 against 61.5),
// and a measurement taken while the host keeps the threads on one cache would not see the difference.
std::atomic<int> g_backward_split{1};
int64_t set_cpu_backward_split(int64_t mode) {
  TORCH_CHECK_VALUE(mode == 0 || mode == 1, "set_cpu_backward_split: mode must be 0 (rows) or 1 (channels), got ",
                    mode);
  return g_backward_split.exchange(static_cast<int>(mode));
}

// The backward measures its chunk rows in the row layout, then the best of them in panels as well, and keeps the
// faster layout with them (a setting is rows * 2 + panels). Panels speed up the grad_weight product where a row of
// columns is long (c5: 4608 values, 18 KiB) and cost the sampling pass its sequential writes where it is short (c3:
// 1152 values), so that neither layout wins everywhere; the results are the same bits in both.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_tiled_route(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const OptTensor& mask, const OptTensor& bias, const DeformConvGeom& g) {
  const int forced = g_col_panels.load(std::memory_order_relaxed);
  const auto run = [&](int64_t setting) {
    const bool panels = forced >= 0 ? forced == 1 : setting % 2 == 1;
    return backward_tiled(grad_output, input, weight, offset, mask, bias, g, setting / 2, panels,
                          g_backward_split.load(std::memory_order_relaxed) == 1);
  };
  return run_measured(
      1, g, mask.has_value(), kBackwardRows, [&](int64_t rows) { return 2 * backward_chunk_rows_fixed(g, rows); },
      [&](int64_t bytes) { return 2 * backward_chunk_rows(g, bytes); }, run,
      [forced](int64_t best) -> int64_t { return forced >= 0 ? -1 : best + 1; });  // forced: nothing to compare
}

// Micro-kernel ISA cap for tests: 2 AVX-512, 1 AVX2, -1 what the processor has. Returns the old cap.
int64_t set_cpu_isa(int64_t cap) {
  TORCH_CHECK_VALUE(cap >= -1 && cap <= 2, "set_cpu_isa: cap must be -1 (none), 1 (AVX2) or 2 (AVX-512), got ", cap);
  TORCH_CHECK_VALUE(cap != 0, "set_cpu_isa: cap 0 would leave the tiled route without a micro-kernel");
  return gemm::isa_cap().exchange(static_cast<int>(cap));
}
// The micro-kernel ISA the tiled route uses now (0: none, the route is not available), how many shapes have had
// their tile sizes measured in this process, whether our parallel loops are compiled for OpenMP (without it,
// at::parallel_for runs our loops on one thread), and how many backward calls split their work by channels.
std::tuple<int64_t, int64_t, int64_t, int64_t> cpu_tiled_info() {
  std::lock_guard<std::mutex> lock(g_tile_mutex);
#ifdef _OPENMP
  const int64_t openmp = 1;
#else
  const int64_t openmp = 0;
#endif
  return {gemm::isa(), g_tile_measurements, openmp, g_channel_split_calls.load()};
}

// GFLOP/s per thread of the micro-kernels' fused multiply-adds from registers alone, all threads at once (as the
// products run): the ceiling of the products' rate (tools/profile_cpu.py). The loop's length is set on the calling
// thread to take about `seconds`; the mean over the threads is returned. 0 where the tiled route has no micro-kernel.
double cpu_fma_peak(double seconds) {
  TORCH_CHECK_VALUE(seconds > 0 && seconds <= 10, "cpu_fma_peak: seconds must be in (0, 10], got ", seconds);
  const int v = gemm::isa();
  if (v == gemm::kNone) return 0.0;
  volatile float sink = 0.f;
  int64_t steps = 1 << 12;
  for (;;) {  // a loop of about a tenth of `seconds` on this thread, then scaled up
    const auto t0 = std::chrono::steady_clock::now();
    gemm::fma_steps(v, steps, sink);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (dt >= seconds / 10 || steps >= (int64_t(1) << 40)) {
      steps = std::max<int64_t>(1, int64_t(double(steps) * seconds / std::max(dt, 1e-9)));
      break;
    }
    steps *= 2;
  }
  const int64_t threads = std::max(1, at::get_num_threads());
  std::vector<double> rate(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      volatile float own = 0.f;
      const auto a = std::chrono::steady_clock::now();
      const double flop = gemm::fma_steps(v, steps, own);
      rate[t] = flop / std::chrono::duration<double>(std::chrono::steady_clock::now() - a).count() / 1e9;
    }
  });
  double sum = 0;
  for (const double r : rate) sum += r;
  return sum / double(threads);
}

// The time for a cache line to pass from one of torch's first two threads to the other and back, halved (ns, the
// median of `rounds` rounds of 20000 exchanges), or -1 with fewer than 2 threads or if the two do not run at once
// (a round over a second). On a virtual machine it tells whether the two virtual cores share a last-level cache
// now: on the 2-core AMD EPYC guests of this project, 24-31 ns where they do and 157-184 ns where the host has
// placed them on two core complexes (which it changes from time to time); the tiled backward's row split hands its
// columns from thread to thread between phases, and runs slower in the second case (tools/benchmark.py notes it).
double cpu_thread_handoff_ns(int64_t rounds) {
  TORCH_CHECK_VALUE(rounds >= 1 && rounds <= 100, "cpu_thread_handoff_ns: rounds must be in [1, 100], got ", rounds);
  if (at::get_num_threads() < 2) return -1.0;
  constexpr int64_t kExchanges = 20000;
  struct alignas(64) Line {
    std::atomic<int64_t> v{0};
  };
  std::vector<double> ns;
  for (int64_t round = 0; round < rounds; ++round) {
    Line line;
    std::atomic<bool> failed{false};
    double dt = -1;
    at::parallel_for(0, 2, 1, [&](int64_t t0, int64_t t1) {
      if (t1 - t0 != 1) {  // one thread got both halves: no partner
        failed = true;
        return;
      }
      const int64_t me = t0;  // 0 writes odd values, 1 even ones
      const auto start = std::chrono::steady_clock::now();
      for (int64_t i = 0; i < kExchanges && !failed.load(std::memory_order_relaxed); ++i) {
        const int64_t want = 2 * i + me, give = want + 1;
        for (int64_t spin = 0; line.v.load(std::memory_order_acquire) != want; ++spin) {
          if ((spin & 4095) == 4095 && std::chrono::steady_clock::now() - start > std::chrono::seconds(1)) {
            failed = true;
            return;
          }
        }
        line.v.store(give, std::memory_order_release);
      }
      if (me == 0) dt = std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - start).count();
    });
    if (failed) return -1.0;
    ns.push_back(dt / double(2 * kExchanges));
  }
  std::nth_element(ns.begin(), ns.begin() + ns.size() / 2, ns.end());
  return ns[ns.size() / 2];
}

bool is_reduced(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }
OptTensor to_float(const OptTensor& t) { return t ? OptTensor(t->to(at::kFloat)) : kNullopt; }

at::Tensor deform_conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                             const OptTensor& mask, const OptTensor& bias, at::IntArrayRef stride,
                             at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  const auto g = check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups);
  auto run = [&](const at::Tensor& x, const at::Tensor& w, const at::Tensor& o, const OptTensor& m,
                 const OptTensor& b) {
    switch (cpu_route_for(x)) {
      case Route::kTiled:
        return forward_tiled_route(x, w, o, m, b, g);
      case Route::kConv:
        return forward_conv_route(x, w, o, m, b, g);
      default:
        return deform_conv2d_forward_impl<CpuKernels>(x, w, o, m, b, g);
    }
  };
  if (is_reduced(input)) {
    return run(input.to(at::kFloat), weight.to(at::kFloat), offset.to(at::kFloat), to_float(mask), to_float(bias))
        .to(input.scalar_type());
  }
  return run(input, weight, offset, mask, bias);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const OptTensor& mask, const OptTensor& bias, at::IntArrayRef stride, at::IntArrayRef padding,
    at::IntArrayRef dilation, int64_t groups, int64_t deform_groups) {
  const auto g = check_deform_conv(input, weight, offset, mask, bias, stride, padding, dilation, groups, deform_groups);
  check_deform_conv_grad(grad_output, input, g);
  auto run = [&](const at::Tensor& go, const at::Tensor& x, const at::Tensor& w, const at::Tensor& o,
                 const OptTensor& m, const OptTensor& b) {
    switch (cpu_route_for(x)) {
      case Route::kTiled:
        return backward_tiled_route(go, x, w, o, m, b, g);
      case Route::kConv:
        return backward_conv_route(go, x, w, o, m, b, g);
      default:
        return deform_conv2d_backward_impl<CpuKernels>(go, x, w, o, m, b, g, x.scalar_type());
    }
  };
  if (is_reduced(input)) {
    const auto dt = input.scalar_type();
    auto [gi, gw, go, gm, gb] = run(grad_output.to(at::kFloat), input.to(at::kFloat), weight.to(at::kFloat),
                                    offset.to(at::kFloat), to_float(mask), to_float(bias));
    return {gi.to(dt), gw.to(dt), go.to(dt), gm.to(dt), gb.to(dt)};
  }
  return run(grad_output, input, weight, offset, mask, bias);
}

}  // namespace
}  // namespace mmdcnv2

TORCH_LIBRARY_FRAGMENT(mmdcnv2, m) {
  // Which CPU route later float32 calls take: 0 automatic, 1 GEMM (MKL), 2 convolution (oneDNN), 3 tiled (own
  // micro-kernels). Returns the old one.
  m.def("set_cpu_route(int route) -> int", &mmdcnv2::set_cpu_route);
  // The tiled route's micro-kernel: a cap on the ISA (tests), and what it uses now with the measurement count.
  m.def("set_cpu_isa(int cap) -> int", &mmdcnv2::set_cpu_isa);
  // The backward's columns: -1 the measured layout, 0 rows, 1 panels (tests; the same results). Returns the old one.
  m.def("set_cpu_col_panels(int mode) -> int", &mmdcnv2::set_cpu_col_panels);
  // The backward's split of the work: 0 rows, 1 channels where it can (tests; the same results). Returns the old one.
  m.def("set_cpu_backward_split(int mode) -> int", &mmdcnv2::set_cpu_backward_split);
  m.def("cpu_tiled_info() -> (int, int, int, int)", &mmdcnv2::cpu_tiled_info);
  // GFLOP/s per thread of the micro-kernels' multiply-adds, from registers, all threads at once (about `seconds`).
  m.def("cpu_fma_peak(float seconds) -> float", &mmdcnv2::cpu_fma_peak);
  // Half the round trip of a cache line between torch's first two threads (ns; -1 with fewer than 2 threads).
  m.def("cpu_thread_handoff_ns(int rounds) -> float", &mmdcnv2::cpu_thread_handoff_ns);
  // The tiled route's phase timers (tools/profile_cpu.py): on (zeroed) or off, and the thread nanoseconds so far.
  m.def("set_cpu_profile(bool on) -> bool", &mmdcnv2::set_cpu_profile);
  m.def("cpu_profile() -> int[]", &mmdcnv2::cpu_profile);
  // Empties the tiled route's pool of scratch buffers (kept between calls); returns the bytes it held.
  m.def("release_cpu_scratch() -> int", &mmdcnv2::release_cpu_scratch);
}

TORCH_LIBRARY_IMPL(mmdcnv2, CPU, m) {
  m.impl("deform_conv2d", &mmdcnv2::deform_conv2d_cpu);
  m.impl("deform_conv2d_backward", &mmdcnv2::deform_conv2d_backward_cpu);
}
