// Small vector primitives for the CPU kernels. Each is compiled twice, for the
// baseline ISA and for AVX2+FMA, and picks the AVX2 version at run time where
// the processor has it: one binary stays portable and still uses the wide units.
#pragma once

#include <cstdint>

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
