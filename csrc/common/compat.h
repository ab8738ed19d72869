// What differs between the torch releases we build against (2.1 to 2.14), in one place.
//
// The sources are C++17; setup.py adds -std=c++20 only when the installed torch's headers demand it.
//   - Optional arguments: torch >= 2.3 makes c10::optional an alias of std::optional; torch 2.1 and 2.2
//     have their own c10::optional, which the dispatcher expects in kernel signatures. OptTensor and
//     kNullopt name whichever the installed torch uses.
//   - at::mm(a, b, out_dtype) (reduced-precision inputs, float output) exists only in newer releases;
//     setup.py defines MMDCNV2_HAS_MM_DTYPE when the installed headers declare it.
#pragma once

#include <ATen/ATen.h>
#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
#include <optional>
#define MMDCNV2_STD_OPTIONAL 1
#else
#include <c10/util/Optional.h>
#define MMDCNV2_STD_OPTIONAL 0
#endif

namespace mmdcnv2 {

#if MMDCNV2_STD_OPTIONAL
using OptTensor = std::optional<at::Tensor>;
inline constexpr auto kNullopt = std::nullopt;
#else
using OptTensor = c10::optional<at::Tensor>;
inline constexpr auto kNullopt = c10::nullopt;
#endif

}  // namespace mmdcnv2
