// Schemas of the deformable convolution ops (defined once, here) and their argument checks.
#include "deform_conv.h"

#include <torch/library.h>

#include <atomic>

namespace mmdcnv2 {

namespace {

std::string shape_str(at::IntArrayRef s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + ")";
}

// Geometry arguments are bounded so that every size computed from them fits in 64 bits.
constexpr int64_t kMaxGeom = (int64_t(1) << 31) - 1;

void check_pair(at::IntArrayRef v, const char* name, int64_t lowest) {
  TORCH_CHECK_VALUE(v.size() == 2, "deform_conv2d: ", name, " must have 2 elements, got ", v.size());
  TORCH_CHECK_VALUE(v[0] >= lowest && v[1] >= lowest && v[0] <= kMaxGeom && v[1] <= kMaxGeom, "deform_conv2d: ", name,
                    " must lie in [", lowest, ", 2^31 - 1], got ", shape_str(v));
}

// a * b + c, or a clear error naming what overflowed
int64_t checked_mad(int64_t a, int64_t b, int64_t c, const char* what) {
  int64_t r;
  TORCH_CHECK_VALUE(!__builtin_mul_overflow(a, b, &r) && !__builtin_add_overflow(r, c, &r), "deform_conv2d: ", what,
                    " overflows 64-bit integers");
  return r;
}

void check_like(const at::Tensor& t, const at::Tensor& input, const char* name) {
  TORCH_CHECK_VALUE(t.device() == input.device(), "deform_conv2d: ", name, " is on ", t.device(), " but input is on ",
                    input.device());
  TORCH_CHECK_VALUE(t.scalar_type() == input.scalar_type(), "deform_conv2d: ", name, " has dtype ", t.scalar_type(),
                    " but input has dtype ", input.scalar_type());
}

}  // namespace

DeformConvGeom check_deform_conv(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& offset,
                                 const OptTensor& mask, const OptTensor& bias, at::IntArrayRef stride,
                                 at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                 int64_t deform_groups) {
  TORCH_CHECK_VALUE(input.dim() == 4, "deform_conv2d: input must be 4-D (N, C, H, W), got shape ",
                    shape_str(input.sizes()));
  TORCH_CHECK_VALUE(weight.dim() == 4, "deform_conv2d: weight must be 4-D (C_out, C_in / groups, kH, kW), got shape ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(offset.dim() == 4,
                    "deform_conv2d: offset must be 4-D (N, 2 * deform_groups * kH * kW, H_out, W_out), got shape ",
                    shape_str(offset.sizes()));
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()),
                    "deform_conv2d: input must be a floating-point tensor, got ", input.scalar_type());
  check_like(weight, input, "weight");
  check_like(offset, input, "offset");
  if (mask) check_like(*mask, input, "mask");
  if (bias) check_like(*bias, input, "bias");
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK_VALUE(groups >= 1 && groups <= kMaxGeom, "deform_conv2d: groups must lie in [1, 2^31 - 1], got ", groups);
  TORCH_CHECK_VALUE(deform_groups >= 1 && deform_groups <= kMaxGeom,
                    "deform_conv2d: deform_groups must lie in [1, 2^31 - 1], got ", deform_groups);

  DeformConvGeom g;
  g.N = input.size(0);
  g.C = input.size(1);
  g.H = input.size(2);
  g.W = input.size(3);
  g.Cout = weight.size(0);
  g.kh = weight.size(2);
  g.kw = weight.size(3);
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.groups = groups;
  g.dgroups = deform_groups;
  TORCH_CHECK_VALUE(g.kh >= 1 && g.kw >= 1, "deform_conv2d: weight's kernel size must be >= 1, got weight shape ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(g.C % groups == 0, "deform_conv2d: input channels (", g.C, ") must be divisible by groups (",
                    groups, ")");
  TORCH_CHECK_VALUE(g.Cout % groups == 0, "deform_conv2d: weight's output channels (", g.Cout,
                    ") must be divisible by groups (", groups, ")");
  TORCH_CHECK_VALUE(g.C % deform_groups == 0, "deform_conv2d: input channels (", g.C,
                    ") must be divisible by deform_groups (", deform_groups, ")");
  TORCH_CHECK_VALUE(weight.size(1) * groups == g.C, "deform_conv2d: weight must have shape (C_out, ", g.C / groups,
                    ", kH, kW) for ", g.C, " input channels and groups=", groups, ", got ", shape_str(weight.sizes()));
  const int64_t eff_h = checked_mad(g.dh, g.kh - 1, 1, "the dilated kernel size (dilation, weight)");
  const int64_t eff_w = checked_mad(g.dw, g.kw - 1, 1, "the dilated kernel size (dilation, weight)");
  const int64_t pad_h = checked_mad(2, g.ph, g.H, "the padded input size (padding, input)");
  const int64_t pad_w = checked_mad(2, g.pw, g.W, "the padded input size (padding, input)");
  TORCH_CHECK_VALUE(pad_h >= eff_h && pad_w >= eff_w, "deform_conv2d: the padded input (", pad_h, " x ", pad_w,
                    ") is smaller than the dilated kernel (", eff_h, " x ", eff_w, ")");
  g.Ho = (pad_h - eff_h) / g.sh + 1;
  g.Wo = (pad_w - eff_w) / g.sw + 1;
  const int64_t K = checked_mad(g.kh, g.kw, 0, "the kernel size kH * kW (weight)");
  const int64_t dgK2 = checked_mad(checked_mad(2, deform_groups, 0, "2 * deform_groups"), K, 0,
                                   "2 * deform_groups * kH * kW (offset channels)");
  int64_t out_numel = checked_mad(g.N, g.Cout, 0, "the output size (input, weight)");
  out_numel = checked_mad(out_numel, g.Ho, 0, "the output size (input, weight, stride, padding)");
  out_numel = checked_mad(out_numel, g.Wo, 0, "the output size (input, weight, stride, padding)");
  (void)out_numel;  // checked only: at::empty would fail with a message that names no argument
  const std::vector<int64_t> want_off = {g.N, dgK2, g.Ho, g.Wo};
  TORCH_CHECK_VALUE(offset.sizes() == at::IntArrayRef(want_off), "deform_conv2d: offset must have shape ",
                    shape_str(want_off), " (N, 2 * deform_groups * kH * kW, H_out, W_out), got ",
                    shape_str(offset.sizes()));
  if (mask) {
    const std::vector<int64_t> want_mask = {g.N, dgK2 / 2, g.Ho, g.Wo};
    TORCH_CHECK_VALUE(mask->sizes() == at::IntArrayRef(want_mask), "deform_conv2d: mask must have shape ",
                      shape_str(want_mask), " (N, deform_groups * kH * kW, H_out, W_out), got ",
                      shape_str(mask->sizes()));
  }
  if (bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.Cout, "deform_conv2d: bias must have shape (", g.Cout,
                      ",), got ", shape_str(bias->sizes()));
  }
  return g;
}

void check_deform_conv_grad(const at::Tensor& grad_output, const at::Tensor& input, const DeformConvGeom& g) {
  const std::vector<int64_t> want = {g.N, g.Cout, g.Ho, g.Wo};
  TORCH_CHECK_VALUE(grad_output.sizes() == at::IntArrayRef(want),
                    "deform_conv2d_backward: grad_output must have shape ", shape_str(want), ", got ",
                    shape_str(grad_output.sizes()));
  check_like(grad_output, input, "grad_output");
}

namespace {
std::atomic<int64_t> g_column_budget{0};
}  // namespace

int64_t column_budget() { return g_column_budget.load(std::memory_order_relaxed); }

int64_t set_column_budget(int64_t bytes) {
  TORCH_CHECK_VALUE(bytes >= 0, "set_column_budget: bytes must be >= 0 (0: the defaults), got ", bytes);
  return g_column_budget.exchange(bytes);
}

int64_t deform_conv_block(const DeformConvGeom& g, int64_t element_size) {
  // About 64 MiB of channels-last input and output, at least one image.
  constexpr int64_t kBudget = int64_t(64) << 20;
  const int64_t per_image = std::max<int64_t>(1, (g.H * g.W * g.C + g.P() * g.Cout) * element_size);
  return std::max<int64_t>(1, std::min<int64_t>(g.N, kBudget / per_image));
}

}  // namespace mmdcnv2

TORCH_LIBRARY_FRAGMENT(mmdcnv2, m) {
  m.def(mmdcnv2::kDeformConv2dSchema);
  m.def(mmdcnv2::kDeformConv2dBackwardSchema);
  // The column workspace of every later call, all devices (bytes; 0: each device's default). Returns the old value.
  m.def("set_column_budget(int bytes) -> int", &mmdcnv2::set_column_budget);
}
