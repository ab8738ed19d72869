// Bilinear sampling shared by the CPU and CUDA kernels of every op.
//
// A sample at the fractional position (h, w) of an H x W map reads the four
// integer corners around it; a corner off the map reads zero. A sample counts
// only where -1 < h < H and -1 < w < W; anything else (NaN and +-inf included)
// is zero and has zero gradient. Corner q is (h0 + q / 2, w0 + q % 2).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace mmdcnv2 {

template <typename acc_t>
struct BilinearSample {
  int64_t index[4];  // y * W + x of each corner; -1 where the corner is off the map
  acc_t weight[4];   // (1-lh)(1-lw), (1-lh)lw, lh(1-lw), lh lw; 0 off the map
  acc_t lh, lw;      // fractional parts of h and w
  bool inside;       // the sample counts at all
  bool all4;         // all four corners are on the map
};

template <typename acc_t>
C10_HOST_DEVICE inline BilinearSample<acc_t> bilinear_sample(acc_t h, acc_t w, int64_t H, int64_t W) {
  BilinearSample<acc_t> s;
  s.inside = (h > acc_t(-1)) && (w > acc_t(-1)) && (h < acc_t(H)) && (w < acc_t(W));
  if (!s.inside) {
    for (int q = 0; q < 4; ++q) {
      s.index[q] = -1;
      s.weight[q] = acc_t(0);
    }
    s.lh = s.lw = acc_t(0);
    s.all4 = false;
    return s;
  }
  const acc_t hf = ::floor(h);
  const acc_t wf = ::floor(w);
  const int64_t h0 = static_cast<int64_t>(hf);
  const int64_t w0 = static_cast<int64_t>(wf);
  s.lh = h - hf;
  s.lw = w - wf;
  const acc_t hh = acc_t(1) - s.lh;
  const acc_t hw = acc_t(1) - s.lw;
  const bool top = h0 >= 0, bottom = h0 + 1 < H, left = w0 >= 0, right = w0 + 1 < W;
  const bool ok[4] = {top && left, top && right, bottom && left, bottom && right};
  const acc_t wt[4] = {hh * hw, hh * s.lw, s.lh * hw, s.lh * s.lw};
  const int64_t idx[4] = {h0 * W + w0, h0 * W + w0 + 1, (h0 + 1) * W + w0, (h0 + 1) * W + w0 + 1};
  s.all4 = true;
  for (int q = 0; q < 4; ++q) {
    s.index[q] = ok[q] ? idx[q] : -1;
    s.weight[q] = ok[q] ? wt[q] : acc_t(0);
    s.all4 = s.all4 && ok[q];
  }
  return s;
}

// Given S[q] = sum_c g_c * x_c(corner q) for the valid corners (0 for the others),
// returns sum_c g_c * value_c and its derivatives along h and w.
template <typename acc_t>
C10_HOST_DEVICE inline void bilinear_backward(const BilinearSample<acc_t>& s, const acc_t S[4], acc_t& value,
                                              acc_t& d_h, acc_t& d_w) {
  const acc_t hh = acc_t(1) - s.lh;
  const acc_t hw = acc_t(1) - s.lw;
  value = s.weight[0] * S[0] + s.weight[1] * S[1] + s.weight[2] * S[2] + s.weight[3] * S[3];
  d_h = hw * (S[2] - S[0]) + s.lw * (S[3] - S[1]);
  d_w = hh * (S[1] - S[0]) + s.lh * (S[3] - S[2]);
}

}  // namespace mmdcnv2

namespace mmdcnv2 {

// RoIAlign's interpolation (used by deformable RoI pooling): a sample counts where
// -1 <= y <= H and -1 <= x <= W; positions in [-1, 0] and [size-1, size] are clamped
// to the border row/column, where the value no longer depends on that coordinate.
template <typename acc_t>
struct ClampedSample {
  int64_t index[4];  // corners (y0,x0), (y0,x1), (y1,x0), (y1,x1); all on the map
  acc_t weight[4];
  acc_t ly, lx;
  bool inside;
  bool clamped_y, clamped_x;  // d(value)/dy (dx) is zero
};

template <typename acc_t>
C10_HOST_DEVICE inline ClampedSample<acc_t> clamped_sample(acc_t y, acc_t x, int64_t H, int64_t W) {
  ClampedSample<acc_t> s;
  s.inside = (y >= acc_t(-1)) && (y <= acc_t(H)) && (x >= acc_t(-1)) && (x <= acc_t(W)) && H > 0 && W > 0;
  if (!s.inside) {
    for (int q = 0; q < 4; ++q) {
      s.index[q] = 0;
      s.weight[q] = acc_t(0);
    }
    s.ly = s.lx = acc_t(0);
    s.clamped_y = s.clamped_x = true;
    return s;
  }
  s.clamped_y = s.clamped_x = false;
  if (y <= acc_t(0)) {
    y = acc_t(0);
    s.clamped_y = true;
  }
  if (x <= acc_t(0)) {
    x = acc_t(0);
    s.clamped_x = true;
  }
  int64_t y0 = static_cast<int64_t>(y), x0 = static_cast<int64_t>(x), y1, x1;
  if (y0 >= H - 1) {
    y0 = y1 = H - 1;
    y = static_cast<acc_t>(y0);
    s.clamped_y = true;
  } else {
    y1 = y0 + 1;
  }
  if (x0 >= W - 1) {
    x0 = x1 = W - 1;
    x = static_cast<acc_t>(x0);
    s.clamped_x = true;
  } else {
    x1 = x0 + 1;
  }
  s.ly = y - static_cast<acc_t>(y0);
  s.lx = x - static_cast<acc_t>(x0);
  const acc_t hy = acc_t(1) - s.ly, hx = acc_t(1) - s.lx;
  s.index[0] = y0 * W + x0;
  s.index[1] = y0 * W + x1;
  s.index[2] = y1 * W + x0;
  s.index[3] = y1 * W + x1;
  s.weight[0] = hy * hx;
  s.weight[1] = hy * s.lx;
  s.weight[2] = s.ly * hx;
  s.weight[3] = s.ly * s.lx;
  return s;
}

// Given S[q] = sum_c g_c * x_c(corner q), the derivatives of sum_c g_c * value_c along y and x.
template <typename acc_t>
C10_HOST_DEVICE inline void clamped_backward(const ClampedSample<acc_t>& s, const acc_t S[4], acc_t& d_y, acc_t& d_x) {
  d_y = s.clamped_y ? acc_t(0) : (acc_t(1) - s.lx) * (S[2] - S[0]) + s.lx * (S[3] - S[1]);
  d_x = s.clamped_x ? acc_t(0) : (acc_t(1) - s.ly) * (S[1] - S[0]) + s.ly * (S[3] - S[2]);
}

// Samples per bin along each axis, at most: the adaptive grid (sampling_ratio 0) is capped here,
// and a larger explicit sampling_ratio is refused (mmdcnv2.ops.reference mirrors both).
constexpr int64_t kMaxRoISamples = 64;

// Geometry of output bin (ph, pw) of one RoI (batch, x1, y1, x2, y2), RoIAlign(aligned=True) style,
// shifted by gamma * (roi_w * dx, roi_h * dy) where (dx, dy) is the bin's learned offset.
template <typename acc_t>
struct RoIBin {
  acc_t y0, x0;          // top-left of the bin
  acc_t step_y, step_x;  // distance between samples
  int64_t grid_h, grid_w;
  acc_t roi_h, roi_w;
  acc_t inv_count;  // 1 / max(grid_h * grid_w, 1)
};

template <typename acc_t>
C10_HOST_DEVICE inline RoIBin<acc_t> roi_bin(acc_t x1, acc_t y1, acc_t x2, acc_t y2, int64_t ph, int64_t pw, int64_t PH,
                                             int64_t PW, acc_t spatial_scale, int64_t sampling_ratio, acc_t gamma,
                                             acc_t dx, acc_t dy) {
  RoIBin<acc_t> b;
  const acc_t sx = x1 * spatial_scale - acc_t(0.5), sy = y1 * spatial_scale - acc_t(0.5);
  b.roi_w = x2 * spatial_scale - acc_t(0.5) - sx;
  b.roi_h = y2 * spatial_scale - acc_t(0.5) - sy;
  // A RoI with a non-finite coordinate (x - x is 0 only for finite x) has no samples:
  // zero output, zero gradients. Adaptive grids are capped at kMaxRoISamples per axis (before
  // the cast to an integer), so that no RoI, however large, makes a thread loop for ever.
  const bool finite = (sx - sx) == acc_t(0) && (sy - sy) == acc_t(0) && (b.roi_w - b.roi_w) == acc_t(0) &&
                      (b.roi_h - b.roi_h) == acc_t(0);
  if (!finite) b.roi_w = b.roi_h = acc_t(0);
  const acc_t bin_h = b.roi_h / acc_t(PH), bin_w = b.roi_w / acc_t(PW);
  constexpr acc_t kMaxGrid = acc_t(kMaxRoISamples);
  b.grid_h = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(::ceil(bin_h < kMaxGrid ? bin_h : kMaxGrid));
  b.grid_w = sampling_ratio > 0 ? sampling_ratio : static_cast<int64_t>(::ceil(bin_w < kMaxGrid ? bin_w : kMaxGrid));
  b.grid_h = b.grid_h > 0 && finite ? b.grid_h : 0;
  b.grid_w = b.grid_w > 0 && finite ? b.grid_w : 0;
  const int64_t count = b.grid_h * b.grid_w;
  b.inv_count = acc_t(1) / acc_t(count > 0 ? count : 1);
  b.y0 = sy + gamma * b.roi_h * dy + acc_t(ph) * bin_h;
  b.x0 = sx + gamma * b.roi_w * dx + acc_t(pw) * bin_w;
  b.step_y = b.grid_h > 0 ? bin_h / acc_t(b.grid_h) : acc_t(0);
  b.step_x = b.grid_w > 0 ? bin_w / acc_t(b.grid_w) : acc_t(0);
  return b;
}

}  // namespace mmdcnv2
