// Launch geometry shared by the CUDA kernels: grid-stride loops over 64-bit index ranges.
#pragma once

#include <algorithm>
#include <cstdint>

namespace mmdcnv2 {

constexpr int kThreads = 256;

// Blocks for `total` work items (capped: the kernels loop with a grid stride).
inline int64_t grid_for(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, int64_t(1) << 20));
}

}  // namespace mmdcnv2
