// The CPU's own matrix-multiply micro-kernels (AVX-512F and AVX2+FMA), for the tiled route of the deformable
// convolution: small products of tiles that stay in the core's cache, with no vendor BLAS in the way, so
// the speed does not depend on which code path a library picks on a given processor.
//
// One micro-kernel call computes an MR x NR block of C:
//   C[i * ldc + j] = (acc ? C[i * ldc + j] : 0) + sum_{p < kdim} A[i * ai + p * ap] * B[p * ldb + j]
// for i < mr <= MR and j < nr <= NR, with one fused multiply-add per term, in order of p. A result
// therefore does not depend on how the caller cuts the p range into pieces (a later piece passes
// acc = true and continues the same chain), nor on the blocking of i and j: results are bit-identical
// whatever the tile sizes and the number of threads.
//
// A is read for all MR rows, also those past mr (callers pad their buffers; the values are discarded);
// B and C are read and written for the first nr columns only (masked loads and stores).
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>

#include "cpu_vec.h"

#if MMDCNV2_X86_DISPATCH
#include <immintrin.h>
#define MMDCNV2_AVX512 __attribute__((target("avx512f")))
#endif

namespace mmdcnv2 {
namespace gemm {

enum Isa : int { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

// What the processor offers.
inline int detected_isa() {
#if MMDCNV2_X86_DISPATCH
  static const int v = __builtin_cpu_supports("avx512f")                                   ? kAvx512
                       : (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ? kAvx2
                                                                                           : kNone;
  return v;
#else
  return kNone;
#endif
}

// A cap below what the processor offers (tests run the AVX2 kernels on an AVX-512 machine); -1: none.
inline std::atomic<int>& isa_cap() {
  static std::atomic<int> cap{-1};
  return cap;
}

inline int isa() {
  const int cap = isa_cap().load(std::memory_order_relaxed);
  return cap < 0 ? detected_isa() : std::min(cap, detected_isa());
}

// Micro-tile rows and columns of an ISA.
inline int tile_mr(int v) { return v == kAvx512 ? 12 : 6; }
inline int tile_nr(int v) { return v == kAvx512 ? 32 : 16; }

#if MMDCNV2_X86_DISPATCH

template <int MR>
MMDCNV2_AVX512 void ukr_avx512(int64_t kdim, const float* A, int64_t ai, int64_t ap, const float* B, int64_t ldb,
                               float* C, int64_t ldc, int mr, int nr, bool acc) {
  const __mmask16 m0 = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
  const __mmask16 m1 = nr >= 32 ? __mmask16(0xFFFF) : nr > 16 ? __mmask16((1u << (nr - 16)) - 1) : __mmask16(0);
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (acc && i < mr) {
      c0[i] = _mm512_maskz_loadu_ps(m0, C + i * ldc);
      c1[i] = _mm512_maskz_loadu_ps(m1, C + i * ldc + 16);
    } else {
      c0[i] = _mm512_setzero_ps();
      c1[i] = _mm512_setzero_ps();
    }
  }
  for (int64_t p = 0; p < kdim; ++p) {
    const float* b = B + p * ldb;
    const __m512 b0 = _mm512_maskz_loadu_ps(m0, b);
    const __m512 b1 = _mm512_maskz_loadu_ps(m1, b + 16);
    const float* a = A + p * ap;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(a[i * ai]);
      c0[i] = _mm512_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(av, b1, c1[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (i < mr) {
      _mm512_mask_storeu_ps(C + i * ldc, m0, c0[i]);
      _mm512_mask_storeu_ps(C + i * ldc + 16, m1, c1[i]);
    }
  }
}

// The same for a whole MR x 32 tile where one of A's strides is 1 (At: A(i, p) = A[p * s + i], else A[i * s + p]):
// no masks, no row tests. The same chain of fused multiply-adds per value, so the same bits as ukr_avx512.
template <int MR, bool At>
MMDCNV2_AVX512 void ukr_avx512_full(int64_t kdim, const float* A, int64_t s, const float* B, int64_t ldb, float* C,
                                    int64_t ldc, bool acc) {
  __m512 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    c0[i] = acc ? _mm512_loadu_ps(C + i * ldc) : _mm512_setzero_ps();
    c1[i] = acc ? _mm512_loadu_ps(C + i * ldc + 16) : _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < kdim; ++p) {
    const __m512 b0 = _mm512_loadu_ps(B + p * ldb);
    const __m512 b1 = _mm512_loadu_ps(B + p * ldb + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 av = _mm512_set1_ps(At ? A[p * s + i] : A[i * s + p]);
      c0[i] = _mm512_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(av, b1, c1[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm512_storeu_ps(C + i * ldc, c0[i]);
    _mm512_storeu_ps(C + i * ldc + 16, c1[i]);
  }
}

MMDCNV2_AVX2 inline __m256i avx2_mask(int n) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
}

template <int MR>
MMDCNV2_AVX2 void ukr_avx2(int64_t kdim, const float* A, int64_t ai, int64_t ap, const float* B, int64_t ldb, float* C,
                           int64_t ldc, int mr, int nr, bool acc) {
  const __m256i m0 = avx2_mask(std::min(nr, 8));
  const __m256i m1 = avx2_mask(std::max(0, nr - 8));
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (acc && i < mr) {
      c0[i] = _mm256_maskload_ps(C + i * ldc, m0);
      c1[i] = _mm256_maskload_ps(C + i * ldc + 8, m1);
    } else {
      c0[i] = _mm256_setzero_ps();
      c1[i] = _mm256_setzero_ps();
    }
  }
  for (int64_t p = 0; p < kdim; ++p) {
    const float* b = B + p * ldb;
    const __m256 b0 = _mm256_maskload_ps(b, m0);
    const __m256 b1 = _mm256_maskload_ps(b + 8, m1);
    const float* a = A + p * ap;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(a + i * ai);
      c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    if (i < mr) {
      _mm256_maskstore_ps(C + i * ldc, m0, c0[i]);
      _mm256_maskstore_ps(C + i * ldc + 8, m1, c1[i]);
    }
  }
}

template <int MR, bool At>
MMDCNV2_AVX2 void ukr_avx2_full(int64_t kdim, const float* A, int64_t s, const float* B, int64_t ldb, float* C,
                                int64_t ldc, bool acc) {
  __m256 c0[MR], c1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    c0[i] = acc ? _mm256_loadu_ps(C + i * ldc) : _mm256_setzero_ps();
    c1[i] = acc ? _mm256_loadu_ps(C + i * ldc + 8) : _mm256_setzero_ps();
  }
  for (int64_t p = 0; p < kdim; ++p) {
    const __m256 b0 = _mm256_loadu_ps(B + p * ldb);
    const __m256 b1 = _mm256_loadu_ps(B + p * ldb + 8);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m256 av = _mm256_broadcast_ss(At ? A + p * s + i : A + i * s + p);
      c0[i] = _mm256_fmadd_ps(av, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(av, b1, c1[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(C + i * ldc, c0[i]);
    _mm256_storeu_ps(C + i * ldc + 8, c1[i]);
  }
}

// `steps` rounds of independent chains of fused multiply-adds in registers (no memory), for the rate a micro-kernel's
// products can reach at most on this core (fma_steps). Returns the sum of the chains' values, for the caller to keep
// (so that the loop is not dropped); `scale` close to 1 keeps the values finite.
template <int Chains>
MMDCNV2_AVX512 float fma_chains_avx512(int64_t steps, float scale) {
  __m512 c[Chains];
  const __m512 a = _mm512_set1_ps(scale), b = _mm512_set1_ps(1e-3f);
  for (int i = 0; i < Chains; ++i) c[i] = _mm512_set1_ps(float(i));
  for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 32
    for (int i = 0; i < Chains; ++i) c[i] = _mm512_fmadd_ps(a, c[i], b);
  }
  for (int i = 1; i < Chains; ++i) c[0] = _mm512_add_ps(c[0], c[i]);
  float out[16];
  _mm512_storeu_ps(out, c[0]);
  float sum = 0.f;
  for (float x : out) sum += x;
  return sum;
}
template <int Chains>
MMDCNV2_AVX2 float fma_chains_avx2(int64_t steps, float scale) {
  __m256 c[Chains];
  const __m256 a = _mm256_set1_ps(scale), b = _mm256_set1_ps(1e-3f);
  for (int i = 0; i < Chains; ++i) c[i] = _mm256_set1_ps(float(i));
  for (int64_t s = 0; s < steps; ++s) {
#pragma GCC unroll 32
    for (int i = 0; i < Chains; ++i) c[i] = _mm256_fmadd_ps(a, c[i], b);
  }
  for (int i = 1; i < Chains; ++i) c[0] = _mm256_add_ps(c[0], c[i]);
  float out[8];
  _mm256_storeu_ps(out, c[0]);
  float sum = 0.f;
  for (float x : out) sum += x;
  return sum;
}

#endif  // MMDCNV2_X86_DISPATCH

// Steps of fma_chains in the ISA v (kAvx2 or kAvx512) on the calling thread, and the floating-point operations they
// make (lanes times chains times 2 per step: as many independent chains as the micro-kernel keeps accumulators, 24
// AVX-512, 12 AVX2); `sink` keeps the result.
inline double fma_steps(int v, int64_t steps, volatile float& sink) {
#if MMDCNV2_X86_DISPATCH
  volatile float scale = 0.999999f;  // read at run time
  sink = sink + (v == kAvx512 ? fma_chains_avx512<24>(steps, scale) : fma_chains_avx2<12>(steps, scale));
  return 2.0 * (v == kAvx512 ? 16 * 24 : 8 * 12) * double(steps);
#else
  (void)v, (void)steps, (void)sink;
  return 0.0;
#endif
}

// C[m x n] (+)= A(i, p) B(p, j) over p < kdim, in micro-tiles of the ISA v (kAvx2 or kAvx512): A(i, p) =
// A[i * ai + p * ap] must be readable for i up to m rounded up to the micro-tile rows; B(p, j) = B[p * ldb + j].
// Single-threaded: callers parallelise over tiles. stream_c: C is far from the core (a large result written once, or
// an accumulator larger than the cache); each micro-kernel call is then preceded by prefetches of the next tile's
// rows of C, so that their cache misses overlap this tile's products instead of stalling the next call (2-4% on
// such products, alone on one core of this project's AMD EPYC machine).
inline void gemm(int v, int64_t m, int64_t n, int64_t kdim, const float* A, int64_t ai, int64_t ap, const float* B,
                 int64_t ldb, float* C, int64_t ldc, bool acc, bool stream_c = false) {
#if MMDCNV2_X86_DISPATCH
  const int MR = tile_mr(v), NR = tile_nr(v);
  for (int64_t j = 0; j < n; j += NR) {
    const int nr = static_cast<int>(std::min<int64_t>(NR, n - j));
    for (int64_t i = 0; i < m; i += MR) {
      const int mr = static_cast<int>(std::min<int64_t>(MR, m - i));
      // the common cases: whole tiles, one of A's strides 1 (unmasked loads, a fixed stride)
      const bool full = mr == MR && nr == NR && (ap == 1 || ai == 1);
      const float* a = A + i * ai;
      float* c = C + i * ldc + j;
      // the next tile; after the last row tile, the first rows of the next column block, which is the caller's next
      // call where it hands over one block at a time (past the end of C a prefetch is a wasted hint, never a fault)
      const int64_t ni = i + MR < m ? i + MR : 0, nj = i + MR < m ? j : j + NR;
      if (stream_c) {
        const int64_t nm = std::min<int64_t>(MR, m - ni);
        for (int64_t r = 0; r < nm; ++r) {
          // a row's NR floats: 2 or 3 cache lines (NR = 32) or 1 or 2 (NR = 16), as its start is aligned or not
          const char* row = reinterpret_cast<const char*>(C + (ni + r) * ldc + nj);
          _mm_prefetch(row, _MM_HINT_T0);
          if (NR > 16) _mm_prefetch(row + 64, _MM_HINT_T0);
          _mm_prefetch(row + NR * sizeof(float) - 1, _MM_HINT_T0);
        }
      }
      if (v == kAvx512 && full) {
        ap == 1 ? ukr_avx512_full<12, false>(kdim, a, ai, B + j, ldb, c, ldc, acc)
                : ukr_avx512_full<12, true>(kdim, a, ap, B + j, ldb, c, ldc, acc);
      } else if (v == kAvx512) {
        ukr_avx512<12>(kdim, A + i * ai, ai, ap, B + j, ldb, C + i * ldc + j, ldc, mr, nr, acc);
      } else if (full) {
        ap == 1 ? ukr_avx2_full<6, false>(kdim, a, ai, B + j, ldb, c, ldc, acc)
                : ukr_avx2_full<6, true>(kdim, a, ap, B + j, ldb, c, ldc, acc);
      } else {
        ukr_avx2<6>(kdim, A + i * ai, ai, ap, B + j, ldb, C + i * ldc + j, ldc, mr, nr, acc);
      }
    }
  }
#else
  (void)v, (void)m, (void)n, (void)kdim, (void)A, (void)ai, (void)ap, (void)B, (void)ldb, (void)C, (void)ldc, (void)acc;
  (void)stream_c;
#endif
}

// The same with B packed in panels of the ISA's NR columns: panel q (columns q * NR ...) at Bp + q * panel_stride,
// row p of a panel at p * NR (a panel is read sequentially: no cache-set conflicts from a long row stride).
inline void gemm_packed(int v, int64_t m, int64_t n, int64_t kdim, const float* A, int64_t ai, int64_t ap,
                        const float* Bp, int64_t panel_stride, float* C, int64_t ldc, bool acc, bool stream_c = false) {
  const int64_t NR = tile_nr(v);
  for (int64_t j = 0; j < n; j += NR) {
    gemm(v, m, std::min(NR, n - j), kdim, A, ai, ap, Bp + (j / NR) * panel_stride, NR, C + j, ldc, acc, stream_c);
  }
}

// A row stride for a buffer of rows of n floats: a multiple of 64 floats (4 KiB strides and their halves) gets 16
// more, so that a micro-tile's rows do not all fall into the same few cache sets.
inline int64_t padded_ld(int64_t n) { return n % 64 == 0 ? n + 16 : n; }

}  // namespace gemm
}  // namespace mmdcnv2
