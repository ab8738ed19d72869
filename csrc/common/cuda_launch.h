// Launch geometry of the CUDA kernels (and of their host emulation, which runs the same grid):
// every kernel loops over its work items with a grid stride, so the grid is capped and any
// 64-bit amount of work is covered. Plain host code: the tests compute launch sizes for huge
// tensors without allocating them (torch.ops.mmdcnv2_emulated.launch_config).
#pragma once

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>

namespace mmdcnv2 {

constexpr int kWarpSize = 32;
#ifndef MMDCNV2_THREADS_PER_BLOCK
#define MMDCNV2_THREADS_PER_BLOCK 256
#endif
constexpr int kThreads = MMDCNV2_THREADS_PER_BLOCK;  // threads per block
// Warp-per-item kernels (a warp's lanes cooperate through shuffles) need whole warps per block.
static_assert(kThreads % kWarpSize == 0, "kThreads must be a multiple of the warp size");
static_assert(kThreads <= 1024, "CUDA allows at most 1024 threads per block");
constexpr int64_t kMaxBlocks = int64_t(1) << 20;  // grid cap; far inside CUDA's 2^31 - 1 for gridDim.x

struct LaunchConfig {
  int64_t blocks;  // 0: nothing to do, launch nothing
  int threads;
};

// Blocks for `items` work items of `threads_per_item` threads each (1, or kWarpSize for a warp per item).
inline LaunchConfig launch_config(int64_t items, int threads_per_item = 1) {
  TORCH_CHECK(items >= 0, "launch_config: negative work size ", items);
  TORCH_CHECK(threads_per_item >= 1 && kThreads % threads_per_item == 0, "launch_config: threads_per_item must divide ",
              kThreads, ", got ", threads_per_item);
  const int64_t items_per_block = kThreads / threads_per_item;
  // ceil(items / items_per_block) without forming items * threads_per_item (no overflow)
  const int64_t blocks = items / items_per_block + (items % items_per_block != 0);
  return {std::min(blocks, kMaxBlocks), kThreads};
}

}  // namespace mmdcnv2
