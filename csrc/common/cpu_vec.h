// Small vector primitives for the CPU kernels. Each is compiled twice, for the
// baseline ISA and for AVX2+FMA, and picks the AVX2 version at run time where
// the processor has it: one binary stays portable and still uses the wide units.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define MMDCNV2_X86_DISPATCH 1
#define MMDCNV2_INLINE inline __attribute__((always_inline))
#define MMDCNV2_AVX2 __attribute__((target("avx2,fma")))
#else
#define MMDCNV2_X86_DISPATCH 0
#define MMDCNV2_INLINE inline
#define MMDCNV2_AVX2
#endif

namespace mmdcnv2 {
namespace vec {

inline bool has_avx2() {
#if MMDCNV2_X86_DISPATCH
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

namespace body {
// dst = w0 a + w1 b + w2 c + w3 d
template <typename T>
MMDCNV2_INLINE void lerp4(T* __restrict__ dst, const T* __restrict__ a, const T* __restrict__ b,
                          const T* __restrict__ c, const T* __restrict__ d, T w0, T w1, T w2, T w3, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = w0 * a[j] + w1 * b[j] + w2 * c[j] + w3 * d[j];
}
// dst += w a
template <typename T>
MMDCNV2_INLINE void axpy(T* __restrict__ dst, const T* __restrict__ a, T w, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] += w * a[j];
}
// s[q] += sum_j g[j] * x_q[j] for the four corners
template <typename T>
MMDCNV2_INLINE void dot4(const T* __restrict__ g, const T* __restrict__ a, const T* __restrict__ b,
                         const T* __restrict__ c, const T* __restrict__ d, T* s, int64_t n) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = 0; j < n; ++j) {
    s0 += g[j] * a[j];
    s1 += g[j] * b[j];
    s2 += g[j] * c[j];
    s3 += g[j] * d[j];
  }
  s[0] += s0;
  s[1] += s1;
  s[2] += s2;
  s[3] += s3;
}
// dst = w0 a + w1 b + w2 c + w3 d and s[q] += sum_j g[j] * x_q[j]: the corners are read once for both
template <typename T>
MMDCNV2_INLINE void lerp4_dot4(T* __restrict__ dst, const T* __restrict__ g, const T* __restrict__ a,
                               const T* __restrict__ b, const T* __restrict__ c, const T* __restrict__ d, T w0, T w1,
                               T w2, T w3, T* s, int64_t n) {
  T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t j = 0; j < n; ++j) {
    const T av = a[j], bv = b[j], cv = c[j], dv = d[j], gv = g[j];
    dst[j] = w0 * av + w1 * bv + w2 * cv + w3 * dv;
    s0 += gv * av;
    s1 += gv * bv;
    s2 += gv * cv;
    s3 += gv * dv;
  }
  s[0] += s0;
  s[1] += s1;
  s[2] += s2;
  s[3] += s3;
}
// lerp4_dot4 of floats with the results going to panels: value e of the run to dst[q * ps + jj] where q * np + jj =
// j0 + e (panels of np values, ps apart), and each sum over the run taken in 8 lanes
// (value e in lane e % 8, whatever the panels; whole groups of 8 in one vector of the compiler's generic vector type,
// which the ISA's copy of the caller turns into its own instructions), the lanes added in order at the end. ahead > 0:
// each piece's place `ahead` values on is prefetched (the same place a few rows on, in panels, where rows are
// written a piece per panel and no stream of lines is there for the processor to foresee). The write hint compiles
// to a plain PREFETCHT0 here (no -mprfchw); a real PREFETCHW measured no faster (AMD EPYC, 2026-12-07).
typedef float Float8 __attribute__((vector_size(32)));
MMDCNV2_INLINE void lerp4_dot4_panels(float* __restrict__ dst, int64_t j0, int64_t np, int64_t ps, int64_t ahead,
                                      const float* __restrict__ g, const float* __restrict__ a,
                                      const float* __restrict__ b, const float* __restrict__ c,
                                      const float* __restrict__ d, float w0, float w1, float w2, float w3, float* s,
                                      int64_t n) {
  Float8 l0 = {}, l1 = {}, l2 = {}, l3 = {};
  const auto one = [&](float* o, int64_t e) {
    const float av = a[e], bv = b[e], cv = c[e], dv = d[e], gv = g[e];
    *o = w0 * av + w1 * bv + w2 * cv + w3 * dv;
    l0[e % 8] += gv * av;
    l1[e % 8] += gv * bv;
    l2[e % 8] += gv * cv;
    l3[e % 8] += gv * dv;
  };
  int64_t q = j0 / np, jj = j0 - q * np;  // the first piece's panel and place in it; the next ones start panels
  for (int64_t e = 0; e < n; ++q, jj = 0) {
    const int64_t m = std::min(n - e, np - jj);
    float* __restrict__ o = dst + q * ps + jj - e;  // value x of this piece at o[x]
    if (ahead > 0) {
      __builtin_prefetch(o + e + ahead, 1, 3);
      __builtin_prefetch(o + e + ahead + (m - 1), 1, 3);
    }
    int64_t x = e;
    for (; x < e + m && x % 8 != 0; ++x) one(o + x, x);
    for (; x + 8 <= e + m; x += 8) {
      Float8 av, bv, cv, dv, gv;
      std::memcpy(&av, a + x, sizeof(av));
      std::memcpy(&bv, b + x, sizeof(bv));
      std::memcpy(&cv, c + x, sizeof(cv));
      std::memcpy(&dv, d + x, sizeof(dv));
      std::memcpy(&gv, g + x, sizeof(gv));
      const Float8 v = w0 * av + w1 * bv + w2 * cv + w3 * dv;
      std::memcpy(o + x, &v, sizeof(v));
      l0 += gv * av;
      l1 += gv * bv;
      l2 += gv * cv;
      l3 += gv * dv;
    }
    for (; x < e + m; ++x) one(o + x, x);
    e += m;
  }
  for (int l = 0; l < 8; ++l) {
    s[0] += l0[l];
    s[1] += l1[l];
    s[2] += l2[l];
    s[3] += l3[l];
  }
}
template <typename T>
MMDCNV2_INLINE T dot(const T* __restrict__ g, const T* __restrict__ a, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += g[j] * a[j];
  return s;
}
}  // namespace body

// Each primitive: an AVX2+FMA copy, a baseline copy, and the entry point that picks one.
template <typename T>
MMDCNV2_AVX2 void lerp4_avx2(T* dst, const T* a, const T* b, const T* c, const T* d, T w0, T w1, T w2, T w3,
                             int64_t n) {
  body::lerp4(dst, a, b, c, d, w0, w1, w2, w3, n);
}
template <typename T>
void lerp4_base(T* dst, const T* a, const T* b, const T* c, const T* d, T w0, T w1, T w2, T w3, int64_t n) {
  body::lerp4(dst, a, b, c, d, w0, w1, w2, w3, n);
}
template <typename T>
inline void lerp4(T* dst, const T* a, const T* b, const T* c, const T* d, T w0, T w1, T w2, T w3, int64_t n) {
  has_avx2() ? lerp4_avx2(dst, a, b, c, d, w0, w1, w2, w3, n) : lerp4_base(dst, a, b, c, d, w0, w1, w2, w3, n);
}

template <typename T>
MMDCNV2_AVX2 void axpy_avx2(T* dst, const T* a, T w, int64_t n) {
  body::axpy(dst, a, w, n);
}
template <typename T>
void axpy_base(T* dst, const T* a, T w, int64_t n) {
  body::axpy(dst, a, w, n);
}
template <typename T>
inline void axpy(T* dst, const T* a, T w, int64_t n) {
  has_avx2() ? axpy_avx2(dst, a, w, n) : axpy_base(dst, a, w, n);
}

template <typename T>
MMDCNV2_AVX2 void dot4_avx2(const T* g, const T* a, const T* b, const T* c, const T* d, T* s, int64_t n) {
  body::dot4(g, a, b, c, d, s, n);
}
template <typename T>
void dot4_base(const T* g, const T* a, const T* b, const T* c, const T* d, T* s, int64_t n) {
  body::dot4(g, a, b, c, d, s, n);
}
template <typename T>
inline void dot4(const T* g, const T* a, const T* b, const T* c, const T* d, T* s, int64_t n) {
  has_avx2() ? dot4_avx2(g, a, b, c, d, s, n) : dot4_base(g, a, b, c, d, s, n);
}

template <typename T>
MMDCNV2_AVX2 void lerp4_dot4_avx2(T* dst, const T* g, const T* a, const T* b, const T* c, const T* d, T w0, T w1, T w2,
                                  T w3, T* s, int64_t n) {
  body::lerp4_dot4(dst, g, a, b, c, d, w0, w1, w2, w3, s, n);
}
template <typename T>
void lerp4_dot4_base(T* dst, const T* g, const T* a, const T* b, const T* c, const T* d, T w0, T w1, T w2, T w3, T* s,
                     int64_t n) {
  body::lerp4_dot4(dst, g, a, b, c, d, w0, w1, w2, w3, s, n);
}
template <typename T>
inline void lerp4_dot4(T* dst, const T* g, const T* a, const T* b, const T* c, const T* d, T w0, T w1, T w2, T w3, T* s,
                       int64_t n) {
  has_avx2() ? lerp4_dot4_avx2(dst, g, a, b, c, d, w0, w1, w2, w3, s, n)
             : lerp4_dot4_base(dst, g, a, b, c, d, w0, w1, w2, w3, s, n);
}

template <typename T>
MMDCNV2_AVX2 T dot_avx2(const T* g, const T* a, int64_t n) {
  return body::dot(g, a, n);
}
template <typename T>
T dot_base(const T* g, const T* a, int64_t n) {
  return body::dot(g, a, n);
}
template <typename T>
inline T dot(const T* g, const T* a, int64_t n) {
  return has_avx2() ? dot_avx2(g, a, n) : dot_base(g, a, n);
}

}  // namespace vec
}  // namespace mmdcnv2
