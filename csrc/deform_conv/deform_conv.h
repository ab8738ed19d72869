// Deformable convolution: shape checks and the device-independent driver.
//
// Both devices run the same algorithm on channels-last (NHWC) data:
//   1. im2col: every output position p and kernel tap k samples the input once
//      per deform group (bilinear weights computed once, reused over the
//      group's channels) and writes the contiguous channel vector
//      cols[p, group, k, c] (times the modulation mask);
//   2. one GEMM per convolution group over a block of images;
//   3. backward: grad_cols = grad_out @ W; one sampling pass rebuilds the columns
//      (for grad_weight) and takes the offset and mask gradients from four dot
//      products per sample (bilinear_backward); grad_input is a scatter of
//      grad_cols (partitioned by channel on the CPU: no atomics).
// The column buffer covers a bounded chunk of output rows, never the whole batch.
#pragma once

#include <ATen/ATen.h>

#include "../common/compat.h"

namespace mmdcnv2 {

// The ops' schemas, defined under torch.ops.mmdcnv2 (deform_conv.cpp) and, for the host emulation of the
// CUDA kernels, under torch.ops.mmdcnv2_emulated (csrc/emulated/emulated_ops.cpp).
inline constexpr const char* kDeformConv2dSchema =
    "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor? mask, Tensor? bias, int[2] stride, "
    "int[2] padding, int[2] dilation, int groups, int deform_groups) -> Tensor";
inline constexpr const char* kDeformConv2dBackwardSchema =
    "deform_conv2d_backward(Tensor grad_output, Tensor input, Tensor weight, Tensor offset, Tensor? mask, "
    "Tensor? bias, int[2] stride, int[2] padding, int[2] dilation, int groups, int deform_groups) "
    "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_offset, Tensor grad_mask, Tensor grad_bias)";

struct DeformConvGeom {
  int64_t N, C, H, W;    // input
  int64_t Cout, kh, kw;  // weight
  int64_t sh, sw, ph, pw, dh, dw;
  int64_t groups, dgroups;
  int64_t Ho, Wo;  // output
  int64_t K() const { return kh * kw; }
  int64_t P() const { return Ho * Wo; }
  int64_t Cg() const { return C / groups; }
  int64_t Cdg() const { return C / dgroups; }
  int64_t Cout_g() const { return Cout / groups; }
  int64_t ldc() const { return kh * kw * C; }  // row length of the column buffer
};

// Validates every argument (names the argument and the expected shape) and returns the geometry.
DeformConvGeom check_deform_conv(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                 const OptTensor& mask, const OptTensor& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                 int64_t deform_groups);

void check_deform_conv_grad(const at::Tensor& grad_output, const at::Tensor& input, const DeformConvGeom& g);

// Number of images converted to channels-last at once (about 64 MiB of input and output).
int64_t deform_conv_block(const DeformConvGeom& g, int64_t element_size);

// The column workspace: Kernels::kColsBytes is the target size of all column buffers of a call
// together (the forward holds one buffer, the backward two: the columns and grad_cols), and
// Kernels::kMinRows the fewest rows that keep a GEMM efficient on that device. Whatever the
// floor, the buffers never exceed kMaxColumnWorkspace together (one row at least).
// set_column_budget(bytes) replaces both with a budget of its own (0: the defaults again):
// tests shrink it to run many chunks on small inputs.
constexpr int64_t kMaxColumnWorkspace = int64_t(256) << 20;
int64_t column_budget();                   // 0 where unset
int64_t set_column_budget(int64_t bytes);  // returns the previous value

// The size of each of the fewest equal chunks of `total` items with at most `cap` items per chunk (>= 1).
inline int64_t equal_chunk(int64_t total, int64_t cap) {
  cap = std::max<int64_t>(1, cap);
  const int64_t chunks = (total + cap - 1) / cap;
  return std::max<int64_t>(1, (total + chunks - 1) / std::max<int64_t>(1, chunks));
}

// Rows (output positions of the block) whose columns are built at once, in chunks of equal size.
template <typename Kernels>
int64_t deform_conv_chunk_rows(const DeformConvGeom& g, int64_t element_size, int64_t rows, int64_t buffers) {
  const int64_t row_bytes = std::max<int64_t>(1, g.ldc() * element_size) * buffers;
  const int64_t budget = column_budget();
  int64_t cap;
  if (budget > 0) {
    cap = std::max<int64_t>(1, budget / row_bytes);
  } else {
    cap = std::max<int64_t>(Kernels::kMinRows, Kernels::kColsBytes / row_bytes);
    cap = std::max<int64_t>(1, std::min<int64_t>(cap, kMaxColumnWorkspace / row_bytes));
  }
  return equal_chunk(rows, cap);
}

// The memory format of the op's output and grad_input: the input's, as torch's conv2d does. Channels-last
// is an input that is channels-last contiguous and not also plain contiguous (then its NHWC data is used
// in place and written in place: no layout copies); anything else gets plain contiguous results.
inline bool is_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}
inline at::MemoryFormat result_format(const at::Tensor& input) {
  return is_channels_last(input) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}
// [N, C, H, W] channels-last -> its [N * H, W, C] memory as a view (rows of images, channel vectors).
inline at::Tensor nhwc_rows(const at::Tensor& t) {
  return t.permute({0, 2, 3, 1}).view({t.size(0) * t.size(2), t.size(3), t.size(1)});
}

// What both backward drivers (deform_conv2d_backward_impl, the CPU convolution route) return, allocated the
// same way: grad_input in the input's memory format - left uninitialised when there is work, since every
// block then writes its part whole -, zeroed offset and mask gradients, the bias gradient, and the weight
// gradient's accumulator [groups, Cout_g, K * Cg] in acc_type, turned into the weight's shape by finish().
struct BackwardResults {
  using Tuple = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  bool work;
  at::Tensor grad_input, grad_offset, grad_mask, grad_bias, gw_acc;

  // own_weight_acc false: where there is work, gw_acc is left undefined for the caller to set (the CPU tiled route
  // takes it from its scratch pool)
  BackwardResults(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& offset,
                  const OptTensor& mask, const OptTensor& bias, const DeformConvGeom& g, at::ScalarType acc_type,
                  bool own_weight_acc = true)
      : work(g.N > 0 && g.P() > 0 && g.C > 0) {
    const auto gi_opts = input.options().memory_format(result_format(input));
    grad_input = work ? at::empty(input.sizes(), gi_opts) : at::zeros(input.sizes(), gi_opts);
    grad_offset = at::zeros(offset.sizes(), offset.options());
    grad_mask = mask ? at::zeros(mask->sizes(), mask->options()) : at::empty({0}, input.options());
    grad_bias = bias ? grad_output.sum({0, 2, 3}).to(bias->scalar_type()) : at::empty({0}, input.options());
    if (own_weight_acc || !work) {
      gw_acc = at::zeros({g.groups, g.Cout_g(), g.K() * g.Cg()}, input.options().dtype(acc_type));
    }
  }
  Tuple finish(const at::Tensor& weight, const DeformConvGeom& g) const {
    auto grad_weight = gw_acc.view({g.groups, g.Cout_g(), g.K(), g.Cg()})
                           .transpose(2, 3)
                           .reshape(weight.sizes())
                           .to(weight.scalar_type())
                           .contiguous();
    return {grad_input, grad_weight, grad_offset, grad_mask, grad_bias};
  }
};

// acc += a @ b with acc in float (double) while a and b may be half/bfloat16: the sum over
// chunks is never rounded to the reduced type on the way.
inline void addmm_accumulate(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.scalar_type() == a.scalar_type()) {
    acc.addmm_(a, b);  // in place: no temporary of the weight's size
#ifdef MMDCNV2_HAS_MM_DTYPE
  } else if (a.is_cuda()) {
    acc.add_(at::mm(a, b, acc.scalar_type()));  // cuBLAS: reduced-precision inputs, float output
#endif
  } else {  // the host emulation of the GPU path; CUDA on a torch without mm(a, b, out_dtype)
    acc.addmm_(a.to(acc.scalar_type()), b.to(acc.scalar_type()));
  }
}

// Kernels provides, for rows [r0, r1) of a block of b images (row r = image r / P, position r % P;
// all tensors contiguous; cols holds the chunk's rows only):
//   im2col(x_nhwc[b,H,W,C], offset[b,2*dg*K,Ho,Wo], mask?[b,dg*K,Ho,Wo], cols[r1-r0, K*C], g, r0, r1)
//   col2im(grad_cols, offset, mask?, grad_x_nhwc[b,H,W,C] (accumulation type, zeroed), g, r0, r1)
//   im2col_coord_grad(x_nhwc, offset, mask?, grad_cols, cols, grad_offset[b,...], grad_mask?[b,...], g, r0, r1):
//       the columns as im2col writes them, and the offset and mask gradients from grad_cols
// and kColsBytes, kMinRows (see deform_conv_chunk_rows).
// What both drivers prepare once per call (contiguous offset and mask, the weight in column
// order, block and chunk sizes) and per block of images (channels-last input, its offsets).
template <typename Kernels>
struct DriverSetup {
  const DeformConvGeom& g;
  at::Tensor offset, w2;
  OptTensor mask;
  int64_t nb, chunk;

  // weight_columns: false where the caller lays out the weight itself (w2 then stays undefined)
  DriverSetup(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset_, const OptTensor& mask_,
              const DeformConvGeom& geom, int64_t buffers, bool weight_columns = true)
      : g(geom),
        offset(offset_.contiguous()),
        // weight [Cout, Cg, kh, kw] -> [groups, Cout_g, K * Cg], matching the column layout (k, c)
        w2(weight_columns ? weight.reshape({geom.groups, geom.Cout_g(), geom.Cg(), geom.K()})
                                .transpose(2, 3)
                                .contiguous()
                                .view({geom.groups, geom.Cout_g(), geom.K() * geom.Cg()})
                          : at::Tensor()),
        mask(mask_ ? OptTensor(mask_->contiguous()) : kNullopt),
        nb(deform_conv_block(geom, input.element_size())),
        chunk(deform_conv_chunk_rows<Kernels>(geom, input.element_size(), nb * geom.P(), buffers)) {}

  struct Block {
    int64_t b;
    at::Tensor x, off;
    OptTensor msk;
  };
  Block block(const at::Tensor& input, int64_t n0) const {
    const int64_t b = std::min(nb, g.N - n0);
    return {b, input.narrow(0, n0, b).permute({0, 2, 3, 1}).contiguous(), offset.narrow(0, n0, b),
            mask ? OptTensor(mask->narrow(0, n0, b)) : kNullopt};
  }
};

template <typename Kernels>
at::Tensor deform_conv2d_forward_impl(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                      const OptTensor& mask, const OptTensor& bias, const DeformConvGeom& g) {
  const int64_t K = g.K(), P = g.P(), Cg = g.Cg(), Cout_g = g.Cout_g();
  const bool cl = is_channels_last(input);
  auto out = at::empty({g.N, g.Cout, g.Ho, g.Wo}, input.options().memory_format(result_format(input)));
  if (out.numel() == 0) return out;
  const DriverSetup<Kernels> s(input, weight, offset, mask, g, 1);
  const auto& w2 = s.w2;
  const int64_t chunk = s.chunk;
  auto cols = at::empty({chunk, g.ldc()}, input.options());
  // channels-last output: the GEMMs write straight into it (its memory is [N * P, Cout])
  auto out_blk = cl ? at::Tensor() : at::empty({s.nb * P, g.Cout}, input.options());
  for (int64_t n0 = 0; n0 < g.N; n0 += s.nb) {
    const auto [b, x, off, msk] = s.block(input, n0);
    auto blk = cl ? nhwc_rows(out.narrow(0, n0, b)).view({b * P, g.Cout}) : out_blk;
    for (int64_t r0 = 0; r0 < b * P; r0 += chunk) {
      const int64_t r1 = std::min(b * P, r0 + chunk);
      auto cb = cols.narrow(0, 0, r1 - r0);
      Kernels::im2col(x, off, msk, cb, g, r0, r1);
      auto ob = blk.narrow(0, r0, r1 - r0);
      for (int64_t gi = 0; gi < g.groups; ++gi) {
        const auto cg = cb.narrow(1, gi * K * Cg, K * Cg);
        const auto wt = w2[gi].t();
        auto og = ob.narrow(1, gi * Cout_g, Cout_g);
        // straight into the group's columns of the output (a strided view): no temporary per group
        bias ? at::addmm_out(og, bias->narrow(0, gi * Cout_g, Cout_g), cg, wt) : at::mm_out(og, cg, wt);
      }
    }
    if (!cl)
      out.narrow(0, n0, b).copy_(out_blk.narrow(0, 0, b * P).view({b, g.Ho, g.Wo, g.Cout}).permute({0, 3, 1, 2}));
  }
  return out;
}

template <typename Kernels>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> deform_conv2d_backward_impl(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
    const OptTensor& mask, const OptTensor& bias, const DeformConvGeom& g, at::ScalarType acc_type) {
  const int64_t K = g.K(), P = g.P(), Cg = g.Cg(), Cout_g = g.Cout_g();
  BackwardResults res(grad_output, input, offset, mask, bias, g, acc_type);
  // channels-last grad_input in the accumulation type: the scatter accumulates in it directly
  const bool gx_in_place = is_channels_last(input) && acc_type == input.scalar_type();
  if (res.work) {
    const DriverSetup<Kernels> s(input, weight, offset, mask, g, 2);
    const auto& w2 = s.w2;
    const int64_t chunk = s.chunk;
    auto cols = at::empty({chunk, g.ldc()}, input.options());
    auto gcols = at::empty({chunk, g.ldc()}, input.options());
    for (int64_t n0 = 0; n0 < g.N; n0 += s.nb) {
      const auto [b, x, off, msk] = s.block(input, n0);
      const auto go = grad_output.narrow(0, n0, b).permute({0, 2, 3, 1}).reshape({b * P, g.Cout});
      auto goff = res.grad_offset.narrow(0, n0, b);
      OptTensor gmsk = mask ? OptTensor(res.grad_mask.narrow(0, n0, b)) : kNullopt;
      auto gx = gx_in_place ? res.grad_input.narrow(0, n0, b).permute({0, 2, 3, 1}).zero_()
                            : at::zeros({b, g.H, g.W, g.C}, input.options().dtype(acc_type));
      for (int64_t r0 = 0; r0 < b * P; r0 += chunk) {
        const int64_t r1 = std::min(b * P, r0 + chunk);
        auto cb = cols.narrow(0, 0, r1 - r0);
        auto gcb = gcols.narrow(0, 0, r1 - r0);
        const auto gor = go.narrow(0, r0, r1 - r0);
        for (int64_t gi = 0; gi < g.groups; ++gi) {  // grad_cols = grad_out @ W
          const auto gog = gor.narrow(1, gi * Cout_g, Cout_g);
          auto gcg = gcb.narrow(1, gi * K * Cg, K * Cg);
          at::mm_out(gcg, gog, w2[gi]);
        }
        // one sampling pass: the columns (for grad_weight) and the offset/mask gradients
        Kernels::im2col_coord_grad(x, off, msk, gcb, cb, goff, gmsk, g, r0, r1);
        for (int64_t gi = 0; gi < g.groups; ++gi) {  // grad_weight += grad_out^T @ cols
          const auto a = gor.narrow(1, gi * Cout_g, Cout_g).t();
          const auto c = cb.narrow(1, gi * K * Cg, K * Cg);
          auto acc = res.gw_acc[gi];
          addmm_accumulate(acc, a, c);
        }
        Kernels::col2im(gcb, off, msk, gx, g, r0, r1);
      }
      if (!gx_in_place) res.grad_input.narrow(0, n0, b).copy_(gx.permute({0, 3, 1, 2}));
    }
  }
  return res.finish(weight, g);
}

}  // namespace mmdcnv2
