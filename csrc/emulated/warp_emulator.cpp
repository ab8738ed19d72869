// Host emulation of a CUDA warp (see csrc/common/device.h): the 32 lanes of a warp are fibers,
// each on its own stack, scheduled by the launching thread. A lane runs until it reaches a
// shuffle (it leaves its value in the warp's slots and yields) or ends. When every lane waits
// at the same shuffle, all of them resume and read each other's values: the lanes really hold
// their own partial sums and really meet, as on a GPU. A full-mask shuffle reached by only
// some of the lanes (the others ended, or wait at another shuffle) raises an error naming the
// lanes: on a GPU that is undefined behaviour.
//
// The fibers switch with a few lines of assembly on x86-64 (no signal-mask system call, and
// AddressSanitizer is told about every switch); other platforms use ucontext.
#define MMDCNV2_EMULATE 1
#include "../common/device.h"

#include <c10/util/Exception.h>

#include <array>
#include <memory>
#include <string>

#if defined(__SANITIZE_ADDRESS__)
#define MMDCNV2_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MMDCNV2_ASAN 1
#endif
#endif
#ifdef MMDCNV2_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

// The hand-written switch returns onto other stacks, which CET shadow stacks forbid: where the
// compiler targets them (__CET__ bit 2), ucontext is used instead.
#if defined(__x86_64__) && !(defined(__CET__) && (__CET__ & 2))
#define MMDCNV2_ASM_SWITCH 1
#endif

#if MMDCNV2_ASM_SWITCH
// void mmdcnv2_emu_switch(void** save_sp, void* next_sp): saves the callee-saved registers on the
// current stack, stores its stack pointer in *save_sp, and continues on next_sp's stack.
asm(R"(
  .text
  .p2align 4
  .globl mmdcnv2_emu_switch
  .hidden mmdcnv2_emu_switch
  .type mmdcnv2_emu_switch, @function
mmdcnv2_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mmdcnv2_emu_switch, .-mmdcnv2_emu_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
extern "C" void mmdcnv2_emu_switch(void** save_sp, void* next_sp);
#else
#include <ucontext.h>
#endif

namespace mmdcnv2 {
namespace emulation {
namespace {

#ifdef MMDCNV2_ASAN
constexpr std::size_t kStackBytes = std::size_t(1) << 20;  // instrumented frames are larger
#else
constexpr std::size_t kStackBytes = std::size_t(256) << 10;
#endif

enum class State : unsigned char { kReady, kWaiting, kDone };

struct Warp {
  // scheduling
  int current = 0;
  State state[kWarpSize];
  int64_t generation[kWarpSize];                      // shuffles each lane has passed
  alignas(16) unsigned char slots[2][kWarpSize][16];  // double-buffered by generation parity
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  ThreadIndex index{0, 0, 0, 0};
  int64_t warp = 0;
  // fibers
  std::array<std::unique_ptr<unsigned char[]>, kWarpSize> stacks;
#if MMDCNV2_ASM_SWITCH
  void* sched_sp = nullptr;
  void* lane_sp[kWarpSize];
#else
  ucontext_t sched_uc, lane_uc[kWarpSize];
#endif
#ifdef MMDCNV2_ASAN
  void* sched_fake_stack = nullptr;
  const void* sched_stack_bottom = nullptr;
  std::size_t sched_stack_size = 0;
#endif
};

thread_local ThreadIndex t_index{0, 0, 0, 0};
thread_local std::unique_ptr<Warp> t_warp;

Warp& warp_state() {
  if (!t_warp) {
    t_warp = std::make_unique<Warp>();
    for (auto& s : t_warp->stacks) s.reset(new unsigned char[kStackBytes]);
  }
  return *t_warp;
}

// --- the two directions of a switch, with AddressSanitizer's fiber annotations
void to_lane(Warp& w, int lane) {
  w.current = lane;
  t_index = {w.warp * kWarpSize + lane, w.index.block, w.index.block_dim, w.index.grid_dim};
#ifdef MMDCNV2_ASAN
  __sanitizer_start_switch_fiber(&w.sched_fake_stack, w.stacks[lane].get(), kStackBytes);
#endif
#if MMDCNV2_ASM_SWITCH
  mmdcnv2_emu_switch(&w.sched_sp, w.lane_sp[lane]);
#else
  swapcontext(&w.sched_uc, &w.lane_uc[lane]);
#endif
#ifdef MMDCNV2_ASAN
  __sanitizer_finish_switch_fiber(w.sched_fake_stack, nullptr, nullptr);
#endif
}

void to_scheduler(Warp& w, bool finished) {
  const int lane = w.current;
#ifdef MMDCNV2_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, w.sched_stack_bottom, w.sched_stack_size);
#endif
#if MMDCNV2_ASM_SWITCH
  mmdcnv2_emu_switch(&w.lane_sp[lane], w.sched_sp);
#else
  swapcontext(&w.lane_uc[lane], &w.sched_uc);
#endif
  (void)finished;
#ifdef MMDCNV2_ASAN
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

[[noreturn]] void lane_entry() {
  Warp& w = *t_warp;
#ifdef MMDCNV2_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &w.sched_stack_bottom, &w.sched_stack_size);
#endif
  w.body(w.ctx);
  w.state[w.current] = State::kDone;
  for (;;) to_scheduler(w, true);  // never resumed once done
}

void init_lane(Warp& w, int lane) {
  unsigned char* bottom = w.stacks[lane].get();
#if MMDCNV2_ASM_SWITCH
  // Stack top, 16-byte aligned: [fake return address 0][lane_entry][6 callee-saved registers].
  // mmdcnv2_emu_switch pops the registers and returns into lane_entry with rsp % 16 == 8,
  // as after a call.
  auto top = reinterpret_cast<uintptr_t>(bottom + kStackBytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&lane_entry);
  for (int r = 0; r < 6; ++r) *--sp = nullptr;
  w.lane_sp[lane] = sp;
#else
  getcontext(&w.lane_uc[lane]);
  w.lane_uc[lane].uc_stack.ss_sp = bottom;
  w.lane_uc[lane].uc_stack.ss_size = kStackBytes;
  w.lane_uc[lane].uc_link = nullptr;
  makecontext(&w.lane_uc[lane], reinterpret_cast<void (*)()>(&lane_entry), 0);
#endif
}

std::string lanes_in(const Warp& w, State s) {
  std::string r;
  for (int l = 0; l < kWarpSize; ++l) {
    if (w.state[l] == s) r += (r.empty() ? "" : ",") + std::to_string(l);
  }
  return r;
}

}  // namespace

ThreadIndex& current() { return t_index; }

void run_warp(int64_t block, int64_t warp, const LaunchConfig& cfg, void (*lane_body)(void*), void* ctx) {
  Warp& w = warp_state();
  w.body = lane_body;
  w.ctx = ctx;
  w.warp = warp;
  w.index = {0, block, cfg.threads, cfg.blocks};
  for (int l = 0; l < kWarpSize; ++l) {
    w.state[l] = State::kReady;
    w.generation[l] = 0;
    init_lane(w, l);
  }
  for (;;) {
    for (int l = 0; l < kWarpSize; ++l) {
      if (w.state[l] == State::kReady) to_lane(w, l);
    }
    int done = 0, waiting = 0;
    for (int l = 0; l < kWarpSize; ++l) {
      done += w.state[l] == State::kDone;
      waiting += w.state[l] == State::kWaiting;
    }
    if (done == kWarpSize) return;
    // Every lane left is at a shuffle. Abandoned lanes hold no resources: their stacks are reused.
    TORCH_CHECK(done == 0, "emulated kernel: block ", block, ", warp ", warp, ": lanes ", lanes_in(w, State::kWaiting),
                " wait at a full-warp shuffle that lanes ", lanes_in(w, State::kDone),
                " never reach (they ended): undefined behaviour on a GPU");
    for (int l = 1; l < kWarpSize; ++l) {
      TORCH_CHECK(w.generation[l] == w.generation[0], "emulated kernel: block ", block, ", warp ", warp, ": lane ", l,
                  " is at shuffle #", w.generation[l], " while lane 0 is at shuffle #", w.generation[0],
                  ": the lanes of a full-warp shuffle diverged");
    }
    for (int l = 0; l < kWarpSize; ++l) w.state[l] = State::kReady;
  }
}

void exchange_down(const void* value, void* out, std::size_t bytes, unsigned delta) {
  Warp& w = *t_warp;
  const int lane = w.current;
  const int buf = static_cast<int>(w.generation[lane] & 1);
  std::memcpy(w.slots[buf][lane], value, bytes);
  w.state[lane] = State::kWaiting;
  to_scheduler(w, false);
  // every lane of the warp has left its value in slots[buf]
  const unsigned src = static_cast<unsigned>(lane) + delta;
  std::memcpy(out, src < unsigned(kWarpSize) ? w.slots[buf][src] : w.slots[buf][lane], bytes);
  ++w.generation[lane];
}

}  // namespace emulation
}  // namespace mmdcnv2
