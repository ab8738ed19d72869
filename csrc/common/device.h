// The device layer under the CUDA kernels. The kernels (csrc/*/cuda/*_kernels.cuh) are written
// once against it and compiled twice:
//   * by nvcc, where it maps onto CUDA (threadIdx, __shfl_down_sync, gpuAtomicAdd, <<<...>>>);
//   * by the host compiler with MMDCNV2_EMULATE defined, where a launch runs every block and
//     every thread of the grid CUDA would get, one warp at a time: the 32 lanes of a warp are
//     fibers on their own stacks that run until they meet at a shuffle, exchange the values
//     each of them holds, and go on (csrc/emulated/warp_emulator.cpp). A full-mask shuffle that
//     not all 32 lanes reach is reported as an error, as it is undefined behaviour on a GPU.
// Everything here lives in the namespace MMDCNV2_DEV_NS (cudadev or emudev), so the two builds
// of the same kernels can sit in one library.
//
// The layer provides: MMDCNV2_KERNEL / MMDCNV2_DEVICE (qualifiers), MMDCNV2_UNROLL,
// dev::global_thread() and dev::grid_threads() (grid-stride loops), dev::lane(),
// dev::atomic_add, dev::shfl_down (full warp), dev::launch (the only way to start a kernel),
// dev::Guard (device guard) and the names of the two builds.
#pragma once

#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "cuda_launch.h"

#if defined(__CUDACC__) && !defined(MMDCNV2_EMULATE)
// ------------------------------------------------------------------ CUDA
#include <ATen/cuda/Atomic.cuh>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#define MMDCNV2_DEV_NS cudadev
#define MMDCNV2_KERNEL __global__
#define MMDCNV2_DEVICE __device__ inline
#define MMDCNV2_UNROLL _Pragma("unroll")

namespace mmdcnv2 {
namespace MMDCNV2_DEV_NS {
namespace dev {

constexpr const char* kName = "CUDA";

MMDCNV2_DEVICE int64_t global_thread() { return blockIdx.x * int64_t(blockDim.x) + threadIdx.x; }
MMDCNV2_DEVICE int64_t grid_threads() { return int64_t(blockDim.x) * gridDim.x; }
MMDCNV2_DEVICE int lane() { return threadIdx.x % kWarpSize; }

template <typename T>
MMDCNV2_DEVICE void atomic_add(T* address, T value) {
  gpuAtomicAdd(address, value);
}

// __shfl_down_sync over the full warp: every lane of the warp must call it.
template <typename T>
MMDCNV2_DEVICE T shfl_down(T value, unsigned delta) {
  return __shfl_down_sync(0xffffffffu, value, delta);
}

using Guard = c10::cuda::CUDAGuard;

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), LaunchConfig cfg, Args... args) {
  if (cfg.blocks == 0) return;
  kernel<<<static_cast<unsigned>(cfg.blocks), cfg.threads, 0, at::cuda::getCurrentCUDAStream()>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace dev
}  // namespace MMDCNV2_DEV_NS
}  // namespace mmdcnv2

#else
// ------------------------------------------------------------------ host emulation
#ifndef MMDCNV2_EMULATE
#error "csrc/common/device.h: compile with nvcc, or define MMDCNV2_EMULATE for the host emulation"
#endif
#include <c10/core/Device.h>

#define MMDCNV2_DEV_NS emudev
#define MMDCNV2_KERNEL inline
#define MMDCNV2_DEVICE inline
#define MMDCNV2_UNROLL

namespace mmdcnv2 {
namespace emulation {

// The CUDA built-ins of the thread that runs now (threadIdx.x, blockIdx.x, blockDim.x, gridDim.x).
struct ThreadIndex {
  int64_t thread, block, block_dim, grid_dim;
};
ThreadIndex& current();

// Runs one warp: lane_body(ctx) once for each of its 32 lanes, as fibers; current() is kept right.
void run_warp(int64_t block, int64_t warp, const LaunchConfig& cfg, void (*lane_body)(void*), void* ctx);

// The calling lane offers `bytes` of value and waits until every lane of its warp has; then
// copies lane (own + delta)'s value into `out` (its own where that lane is past the warp).
void exchange_down(const void* value, void* out, std::size_t bytes, unsigned delta);

}  // namespace emulation

namespace MMDCNV2_DEV_NS {
namespace dev {

constexpr const char* kName = "emulated";

inline int64_t global_thread() {
  const auto& t = emulation::current();
  return t.block * t.block_dim + t.thread;
}
inline int64_t grid_threads() {
  const auto& t = emulation::current();
  return t.block_dim * t.grid_dim;
}
inline int lane() { return static_cast<int>(emulation::current().thread % kWarpSize); }

// Lanes run one at a time: a plain add is atomic here.
template <typename T>
inline void atomic_add(T* address, T value) {
  *address += value;
}

template <typename T>
inline T shfl_down(T value, unsigned delta) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 16, "shfl_down: a register-sized value");
  T out;
  emulation::exchange_down(&value, &out, sizeof(T), delta);
  return out;
}

struct Guard {
  explicit Guard(const c10::Device&) {}
};

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), LaunchConfig cfg, Args... args) {
  if (cfg.blocks == 0) return;
  TORCH_CHECK(cfg.threads % kWarpSize == 0 && cfg.threads <= 1024 && cfg.blocks <= (int64_t(1) << 31) - 1,
              "launch: grid of ", cfg.blocks, " blocks x ", cfg.threads, " threads is outside CUDA's limits");
  struct Ctx {
    void (*kernel)(Params...);
    std::tuple<Args...> args;
  } ctx{kernel, std::tuple<Args...>(args...)};
  auto body = [](void* p) {
    auto* c = static_cast<Ctx*>(p);
    std::apply([c](auto... a) { c->kernel(a...); }, c->args);
  };
  for (int64_t b = 0; b < cfg.blocks; ++b) {
    for (int64_t w = 0; w < cfg.threads / kWarpSize; ++w) emulation::run_warp(b, w, cfg, body, &ctx);
  }
}

}  // namespace dev
}  // namespace MMDCNV2_DEV_NS
}  // namespace mmdcnv2

#endif
