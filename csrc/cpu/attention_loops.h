// Inner loops of the CPU attention kernel (csrc/cpu/attention.cpp): the row
// operations of the online softmax (its tile products are vector_loops.h's
// tile_gemm). Like vector_loops.h they are compiled for x86-64-v3 and for
// the baseline ISA with the right one picked at load time; each entry point
// does a whole tile, so the dispatch is paid per tile, not per element.
//
// The code uses GCC's vector extensions (32-byte vectors: 8 floats or 4
// doubles) rather than intrinsics: the same source then compiles to AVX2+FMA in
// the x86-64-v3 clone and to pairs of SSE registers in the default one.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>

#include "cpu/vector_loops.h"

namespace fastnlp {
namespace attention_detail {

__attribute__((always_inline)) inline float exp_any(float x) { return vmath_detail::exp_one_float(x); }
__attribute__((always_inline)) inline double exp_any(double x) { return vmath_detail::exp_one(x); }

// x[j] = exp(x[j] - shift) for j < n (n a multiple of W); returns the sum.
// The exp loop is left to the vectoriser; the sum is kept in a vector so it
// vectorises without -ffast-math (a scalar float sum may not be reordered).
template <typename T>
__attribute__((always_inline)) inline T exp_shift_sum_impl(int64_t n, T* x, T shift) {
  using V = typename Simd<T>::V;
  using U = typename Simd<T>::U;
  constexpr int W = Simd<T>::W;
  for (int64_t j = 0; j < n; ++j) x[j] = exp_any(x[j] - shift);
  V acc{};
  for (int64_t j = 0; j < n; j += W) acc += *reinterpret_cast<const U*>(x + j);
  T s = 0;
  for (int l = 0; l < W; ++l) s += acc[l];
  return s;
}

// The float case written on whole vectors, the same formula as
// vmath_detail::exp_one_float:
// the vectoriser's version of the loop above reloads its dozen constants from
// memory on every iteration, this one keeps them in registers (17% faster, and
// the softmax is the largest cost after the products).
template <>
__attribute__((always_inline)) inline float exp_shift_sum_impl<float>(int64_t n, float* x, float shift) {
  using V = Simd<float>::V;
  using U = Simd<float>::U;
  typedef int32_t VI __attribute__((vector_size(32)));
  const V log2e = V{} + 1.44269504f, ln2_hi = V{} + 0.693145752f, ln2_lo = V{} + 1.42860677e-6f;
  const V shifter = V{} + 12582912.0f, lowest = V{} - 87.0f, one = V{} + 1.0f;
  const V c7 = V{} + 1.0f / 5040, c6 = V{} + 1.0f / 720, c5 = V{} + 1.0f / 120, c4 = V{} + 1.0f / 24;
  const V c3 = V{} + 1.0f / 6, c2 = V{} + 0.5f;
  V acc{};
  for (int64_t j = 0; j < n; j += 8) {
    const V v = *reinterpret_cast<const U*>(x + j) - shift;  // <= 0: shift is the row max or the lse
    const V t = v * log2e + shifter;
    const V k = t - shifter;
    const V r = (v - k * ln2_hi) - k * ln2_lo;
    V p = c7 * r + c6;
    p = p * r + c5;
    p = p * r + c4;
    p = p * r + c3;
    p = p * r + c2;
    p = p * r + one;
    p = p * r + one;
    // Casts between vector types of one size reinterpret the bits (GCC vector extensions).
    const VI biased = ((VI)t - (VI)shifter + 127) << 23;
    V e = p * (V)biased;
    e = v < lowest ? V{} : e;
    *reinterpret_cast<U*>(x + j) = e;
    acc += e;
  }
  float s = 0;
  for (int l = 0; l < 8; ++l) s += acc[l];
  return s;
}

// max_j x[j] (n a multiple of W); -inf for a row that is all -inf.
template <typename T>
__attribute__((always_inline)) inline T row_max_impl(int64_t n, const T* x) {
  using V = typename Simd<T>::V;
  using U = typename Simd<T>::U;
  constexpr int W = Simd<T>::W;
  V acc = V{} - std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; j += W) {
    const V v = *reinterpret_cast<const U*>(x + j);
    acc = v > acc ? v : acc;
  }
  T m = acc[0];
  for (int l = 1; l < W; ++l) m = acc[l] > m ? acc[l] : m;
  return m;
}

// One online-softmax step over a tile of `rows` score rows S[r * ld + c],
// c < n, already masked: with m_new = max(m[r], max_c S), the row becomes
// exp(S - m_new), l[r] = l[r] * alpha[r] + its sum and m[r] = m_new, where
// alpha[r] = exp(m[r] - m_new) is the factor the caller must apply to its
// output accumulator. A row with nothing visible so far is set to 0 with
// alpha = 1. One call per tile rather than several per row: at 64 columns the
// per-call costs were a fifth of the forward pass.
template <typename T>
__attribute__((always_inline)) inline void online_softmax_impl(int64_t rows, int64_t n, T* S, int64_t ld, T* m,
                                                               T* l, T* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    T* s = S + r * ld;
    const T m_new = std::max(m[r], row_max_impl(n, s));
    if (m_new == -std::numeric_limits<T>::infinity()) {
      // Nothing visible so far, or only NaN scores (NaN in q or k), which
      // the max skips. softmax is NaN there: l turns NaN and stays NaN
      // (NaN * alpha + sum), so the row's output and lse come out NaN.
      bool nan = false;
      for (int64_t c = 0; c < n; ++c) nan |= s[c] != s[c];
      for (int64_t c = 0; c < n; ++c) s[c] = T(0);
      alpha[r] = T(1);
      if (nan) l[r] = std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    alpha[r] = exp_any(m[r] - m_new);  // 0 when m[r] = -inf
    l[r] = l[r] * alpha[r] + exp_shift_sum_impl(n, s, m_new);
    m[r] = m_new;
  }
}

// S[r * ld + c] = exp(S[r * ld + c] - shift[r]) for r < rows, c < n.
template <typename T>
__attribute__((always_inline)) inline void exp_rows_impl(int64_t rows, int64_t n, T* S, int64_t ld, const T* shift) {
  for (int64_t r = 0; r < rows; ++r) exp_shift_sum_impl(n, S + r * ld, shift[r]);
}

}  // namespace attention_detail

FASTNLP_VECTOR_CLONES inline float exp_shift_sum(int64_t n, float* x, float shift) {
  return attention_detail::exp_shift_sum_impl(n, x, shift);
}
FASTNLP_VECTOR_CLONES inline double exp_shift_sum(int64_t n, double* x, double shift) {
  return attention_detail::exp_shift_sum_impl(n, x, shift);
}

FASTNLP_VECTOR_CLONES inline float row_max(int64_t n, const float* x) { return attention_detail::row_max_impl(n, x); }
FASTNLP_VECTOR_CLONES inline double row_max(int64_t n, const double* x) {
  return attention_detail::row_max_impl(n, x);
}

FASTNLP_VECTOR_CLONES inline void online_softmax(int64_t rows, int64_t n, float* S, int64_t ld, float* m, float* l,
                                                 float* alpha) {
  attention_detail::online_softmax_impl(rows, n, S, ld, m, l, alpha);
}
FASTNLP_VECTOR_CLONES inline void online_softmax(int64_t rows, int64_t n, double* S, int64_t ld, double* m,
                                                 double* l, double* alpha) {
  attention_detail::online_softmax_impl(rows, n, S, ld, m, l, alpha);
}

FASTNLP_VECTOR_CLONES inline void exp_rows(int64_t rows, int64_t n, float* S, int64_t ld, const float* shift) {
  attention_detail::exp_rows_impl(rows, n, S, ld, shift);
}
FASTNLP_VECTOR_CLONES inline void exp_rows(int64_t rows, int64_t n, double* S, int64_t ld, const double* shift) {
  attention_detail::exp_rows_impl(rows, n, S, ld, shift);
}

}  // namespace fastnlp
