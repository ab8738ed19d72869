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
