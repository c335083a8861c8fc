// The innermost loops of the CPU kernels, written so the compiler vectorises
// them, and compiled twice (x86-64-v3: AVX2+FMA, and the baseline ISA) with the
// right one picked at load time: a wheel built on one x86 machine stays
// portable while machines with AVX2 get 8-wide float loops. Each function is a
// whole step (all K rows), so the dispatch cost is paid once per step, not
// once per row.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTNLP_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTNLP_VECTOR_CLONES
#endif

namespace fastnlp {

// 32-byte (AVX2) vector types for one scalar type, for the loops written on
// whole vectors with GCC's vector extensions: V, W lanes of it, U the same
// for unaligned loads and stores, and I a vector of W integers of the
// scalar's width (comparison masks, indices).
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
  typedef float U __attribute__((vector_size(32), may_alias, aligned(4)));  // unaligned load/store
  typedef int32_t Lane;
  typedef Lane I __attribute__((vector_size(32)));
  static constexpr int W = 8;
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
  typedef double U __attribute__((vector_size(32), may_alias, aligned(8)));
  typedef int64_t Lane;
  typedef Lane I __attribute__((vector_size(32)));
  static constexpr int W = 4;
};

// exp and log over arrays, vectorisable (no library calls, no int<->double
// conversions AVX2 lacks). Accurate to ~1 ulp on the ranges the CRF uses;
// results that would be subnormal are returned as 0 (exp) or taken from
// std::log (log), and the kernels treat values that small as a precision risk
// anyway. Checked against std::exp/std::log in python_tests/test_crf.py via
// the float64 reference comparisons.
namespace vmath_detail {

__attribute__((always_inline)) inline double bits_to_double(uint64_t u) {
  double d;
  __builtin_memcpy(&d, &u, sizeof d);
  return d;
}
__attribute__((always_inline)) inline uint64_t double_to_bits(double d) {
  uint64_t u;
  __builtin_memcpy(&u, &d, sizeof u);
  return u;
}

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln 2, split so k * kLn2Hi is exact
constexpr double kLn2Lo = 1.90821492927058770002e-10;
constexpr double kShifter = 6755399441055744.0;        // 1.5 * 2^52: adding it rounds to an integer
constexpr double kExpMin = -708.0;                     // below: subnormal or zero result
constexpr double kExpMax = 709.0;

__attribute__((always_inline)) inline double exp_one(double x) {
  const double t = x * kLog2e + kShifter;
  const double k = t - kShifter;  // round(x / ln 2)
  const double r = (x - k * kLn2Hi) - k * kLn2Lo;
  // exp(r) for |r| <= ln(2)/2: Taylor series to r^13 (truncation < 1e-17).
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // 2^k from the integer sitting in t's low mantissa bits.
  const uint64_t biased = (double_to_bits(t) - double_to_bits(kShifter) + 1023) << 52;
  const double result = p * bits_to_double(biased);
  return x < kExpMin ? 0.0 : (x > kExpMax ? __builtin_inf() : result);
}

// exp for float, same construction as exp_one: round x / ln 2 to
// an integer k with the 1.5 * 2^23 trick, a Taylor polynomial on the
// remainder (|r| <= ln(2)/2, degree 7: truncation < 1e-8 relative) and 2^k
// built in the exponent bits. Arguments below -87 (including -inf) give 0.
__attribute__((always_inline)) inline float exp_one_float(float x) {
  constexpr float kLog2e = 1.44269504f;
  constexpr float kLn2Hi = 0.693145752f;  // ln 2 with the low bits cleared, so k * kLn2Hi is exact
  constexpr float kLn2Lo = 1.42860677e-6f;
  constexpr float kShifter = 12582912.0f;  // 1.5 * 2^23
  const float t = x * kLog2e + kShifter;
  const float k = t - kShifter;
  const float r = (x - k * kLn2Hi) - k * kLn2Lo;
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  uint32_t tb, sb;
  __builtin_memcpy(&tb, &t, 4);
  const float shifter = kShifter;
  __builtin_memcpy(&sb, &shifter, 4);
  const uint32_t biased = (tb - sb + 127u) << 23;
  float scale;
  __builtin_memcpy(&scale, &biased, 4);
  const float result = p * scale;
  return x < -87.0f ? 0.0f : (x > 88.0f ? __builtin_inff() : result);
}

__attribute__((always_inline)) inline double log_one(double x) {
  const uint64_t u = double_to_bits(x);
  // Split x = m * 2^e with m in [sqrt(1/2), sqrt(2)).
  const uint64_t mantissa_bits = (u & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL;
  double m = bits_to_double(mantissa_bits);
  const double biased_exponent = bits_to_double((u >> 52) | 0x4330000000000000ULL) - 4503599627370496.0;
  const bool big = m > 1.4142135623730951;
  m = big ? 0.5 * m : m;
  const double e = biased_exponent - 1023.0 + (big ? 1.0 : 0.0);
  // log(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716: odd series to s^25.
  const double s = (m - 1.0) / (m + 1.0);
  const double z = s * s;
  double p = 1.0 / 25;
  p = p * z + 1.0 / 23;
  p = p * z + 1.0 / 21;
  p = p * z + 1.0 / 19;
  p = p * z + 1.0 / 17;
  p = p * z + 1.0 / 15;
  p = p * z + 1.0 / 13;
  p = p * z + 1.0 / 11;
  p = p * z + 1.0 / 9;
  p = p * z + 1.0 / 7;
  p = p * z + 1.0 / 5;
  p = p * z + 1.0 / 3;
  p = p * z + 1.0;
  return e * kLn2Hi + (2.0 * s * p + e * kLn2Lo);
}

}  // namespace vmath_detail

// out[j] = exp(x[j] - shift). In place (out == x) is allowed: element j reads
// only x[j], so the pointers are deliberately not __restrict.
FASTNLP_VECTOR_CLONES inline void exp_shifted(int64_t n, const double* x, double shift, double* out) {
  for (int64_t j = 0; j < n; ++j) out[j] = vmath_detail::exp_one(x[j] - shift);
}

// out[j] = exp(x[j] - shift) rounded to float: the float32 tier of the
// scaled CRF recursions, whose weights are computed in double so that the
// only error is the final rounding.
FASTNLP_VECTOR_CLONES inline void exp_shifted(int64_t n, const double* __restrict x, double shift,
                                              float* __restrict out) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(vmath_detail::exp_one(x[j] - shift));
}

// Whether some x[j] is NaN or +inf (not below +inf): scores the CRF refuses.
// An OR over integers of the scalar's width, so the loop is one compare and
// one OR per vector (an int64 count would widen every float lane).
template <typename scalar_t>
__attribute__((always_inline)) inline bool any_nan_or_inf_impl(int64_t n, const scalar_t* x) {
  typename Simd<scalar_t>::Lane bad = 0;
  for (int64_t j = 0; j < n; ++j) bad |= !(x[j] < __builtin_inf());
  return bad != 0;
}
FASTNLP_VECTOR_CLONES inline bool any_nan_or_inf(int64_t n, const float* x) { return any_nan_or_inf_impl(n, x); }
FASTNLP_VECTOR_CLONES inline bool any_nan_or_inf(int64_t n, const double* x) { return any_nan_or_inf_impl(n, x); }

// out[j] = log(x[j]); exact 0 gives -inf; subnormal, infinite or NaN inputs
// (which a vectorised formula would get wrong) go through std::log.
FASTNLP_VECTOR_CLONES inline void log_array(int64_t n, const double* __restrict x, double* __restrict out) {
  for (int64_t j = 0; j < n; ++j) out[j] = vmath_detail::log_one(x[j]);
  int64_t special = 0;
  for (int64_t j = 0; j < n; ++j) special += !(x[j] >= 2.2250738585072014e-308 && x[j] <= 1.7976931348623157e308);
  if (special)
    for (int64_t j = 0; j < n; ++j)
      if (!(x[j] >= 2.2250738585072014e-308 && x[j] <= 1.7976931348623157e308)) out[j] = std::log(x[j]);
}

namespace vmath_detail {

// s[j0 + x] = sum_i a[i] * M[i * ld + j0 + x] for x < V * W: V vectors of
// columns held in registers over all m rows, with two sets of accumulators
// (even and odd rows) so the multiply-adds do not wait on each other.
template <typename T, int V>
__attribute__((always_inline)) inline void vecmat_columns(int64_t m, const T* __restrict a, const T* __restrict M,
                                                          int64_t ld, T* __restrict s) {
  using Vec = typename Simd<T>::V;
  using U = typename Simd<T>::U;
  constexpr int W = Simd<T>::W;
  Vec even[V], odd[V];
  for (int v = 0; v < V; ++v) even[v] = odd[v] = Vec{};
  int64_t i = 0;
  for (; i + 2 <= m; i += 2) {
    const T a0 = a[i], a1 = a[i + 1];
    const T* r0 = M + i * ld;
    const T* r1 = r0 + ld;
    for (int v = 0; v < V; ++v) {
      even[v] += a0 * *reinterpret_cast<const U*>(r0 + W * v);
      odd[v] += a1 * *reinterpret_cast<const U*>(r1 + W * v);
    }
  }
  if (i < m) {
    const T a0 = a[i];
    const T* r0 = M + i * ld;
    for (int v = 0; v < V; ++v) even[v] += a0 * *reinterpret_cast<const U*>(r0 + W * v);
  }
  for (int v = 0; v < V; ++v) *reinterpret_cast<U*>(s + W * v) = even[v] + odd[v];
}

// vecmat_columns<T, 1> with four sets of accumulators (rows i mod 4): one
// vector of columns alone would wait on its multiply-adds with two.
template <typename T>
__attribute__((always_inline)) inline void vecmat_last_columns(int64_t m, const T* __restrict a,
                                                               const T* __restrict M, int64_t ld, T* __restrict s) {
  using Vec = typename Simd<T>::V;
  using U = typename Simd<T>::U;
  Vec acc[4] = {Vec{}, Vec{}, Vec{}, Vec{}};
  int64_t i = 0;
  for (; i + 4 <= m; i += 4)
    for (int r = 0; r < 4; ++r) acc[r] += a[i + r] * *reinterpret_cast<const U*>(M + (i + r) * ld);
  for (int r = 0; i < m; ++i, ++r) acc[r] += a[i] * *reinterpret_cast<const U*>(M + i * ld);
  *reinterpret_cast<U*>(s) = (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// s[j] = sum_i a[i] * M[i * ld + j] for i < m, j < n: one step of a scaled
// recursion. Up to 4 vectors of columns at a time stay in registers while the
// rows of M stream past once. The last n % W columns are done as the last W
// columns when n >= W (recomputing some, to within rounding: that block sums
// its rows in another order), one by one only when n < W.
// (M is finite, so rows with a[i] = 0 add exactly 0.)
template <typename T>
__attribute__((always_inline)) inline void vecmat_impl(int64_t m, int64_t n, const T* __restrict a,
                                                       const T* __restrict M, int64_t ld, T* __restrict s) {
  constexpr int W = Simd<T>::W;
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) vecmat_columns<T, 4>(m, a, M + j, ld, s + j);
  if (j + 3 * W <= n) {
    vecmat_columns<T, 3>(m, a, M + j, ld, s + j);
    j += 3 * W;
  } else if (j + 2 * W <= n) {
    vecmat_columns<T, 2>(m, a, M + j, ld, s + j);
    j += 2 * W;
  } else if (j + W <= n) {
    vecmat_columns<T, 1>(m, a, M + j, ld, s + j);
    j += W;
  }
  if (j < n && n >= W) {
    vecmat_last_columns<T>(m, a, M + n - W, ld, s + n - W);
    return;
  }
  for (; j < n; ++j) {
    T even = 0, odd = 0;
    int64_t i = 0;
    for (; i + 2 <= m; i += 2) {
      even += a[i] * M[i * ld + j];
      odd += a[i + 1] * M[(i + 1) * ld + j];
    }
    if (i < m) even += a[i] * M[i * ld + j];
    s[j] = even + odd;
  }
}

}  // namespace vmath_detail

FASTNLP_VECTOR_CLONES inline void vecmat(int64_t m, int64_t n, const float* __restrict a, const float* __restrict M,
                                         int64_t ld, float* __restrict s) {
  vmath_detail::vecmat_impl(m, n, a, M, ld, s);
}
FASTNLP_VECTOR_CLONES inline void vecmat(int64_t m, int64_t n, const double* __restrict a,
                                         const double* __restrict M, int64_t ld, double* __restrict s) {
  vmath_detail::vecmat_impl(m, n, a, M, ld, s);
}

// G[i * ld + j] += c[i] * M[i * ld + j] * w[j]: accumulating pairwise marginals.
FASTNLP_VECTOR_CLONES inline void scaled_outer_accumulate(int64_t m, int64_t n, const double* __restrict c,
                                                          const double* __restrict M, int64_t ld,
                                                          const double* __restrict w, double* __restrict G) {
  for (int64_t i = 0; i < m; ++i) {
    const double ci = c[i];
    if (ci == 0) continue;
    const double* row = M + i * ld;
    double* out = G + i * ld;
    for (int64_t j = 0; j < n; ++j) out[j] += ci * row[j] * w[j];
  }
}

// Emission log-weights of one position: y[j] = base[j] + e[j] - m, where m =
// max_j (base[j] + e[j]) is returned. *tiny counts the y[j] in (-inf, log_tiny):
// weights too small for the scaled recursions.
template <typename scalar_t>
__attribute__((always_inline)) inline double shifted_scores_impl(int64_t n, const double* __restrict base,
                                                                 const scalar_t* __restrict e, double log_tiny,
                                                                 double* __restrict y, int64_t* tiny) {
  // The max four lanes at a time (GCC does not vectorise a max of doubles
  // without -ffast-math); NaNs are skipped, as in the scalar form.
  typedef double v4 __attribute__((vector_size(32), aligned(8)));
  v4 mv = {-__builtin_inf(), -__builtin_inf(), -__builtin_inf(), -__builtin_inf()};
  int64_t j0 = 0;
  for (; j0 + 4 <= n; j0 += 4) {
    const v4 ev = {static_cast<double>(e[j0]), static_cast<double>(e[j0 + 1]), static_cast<double>(e[j0 + 2]),
                   static_cast<double>(e[j0 + 3])};
    const v4 yv = *reinterpret_cast<const v4*>(base + j0) + ev;
    *reinterpret_cast<v4*>(y + j0) = yv;
    mv = yv > mv ? yv : mv;
  }
  double m = -__builtin_inf();
  for (int l = 0; l < 4; ++l) m = mv[l] > m ? mv[l] : m;
  for (int64_t j = j0; j < n; ++j) {
    y[j] = base[j] + static_cast<double>(e[j]);
    m = y[j] > m ? y[j] : m;
  }
  int64_t count = 0;
  for (int64_t j = 0; j < n; ++j) {
    y[j] -= m;
    count += (y[j] < log_tiny) & (y[j] > -__builtin_inf());
  }
  *tiny = count;
  return m;
}
FASTNLP_VECTOR_CLONES inline double shifted_scores(int64_t n, const double* base, const float* e, double log_tiny,
                                                   double* y, int64_t* tiny) {
  return shifted_scores_impl(n, base, e, log_tiny, y, tiny);
}
FASTNLP_VECTOR_CLONES inline double shifted_scores(int64_t n, const double* base, const double* e, double log_tiny,
                                                   double* y, int64_t* tiny) {
  return shifted_scores_impl(n, base, e, log_tiny, y, tiny);
}

namespace vmath_detail {

// The largest of x[0..n) and 0, W lanes at a time (GCC vectorises no max of
// floating values without -ffast-math); NaN never wins.
template <typename T>
__attribute__((always_inline)) inline T max_or_zero(int64_t n, const T* __restrict x) {
  using Vec = typename Simd<T>::V;
  using U = typename Simd<T>::U;
  constexpr int W = Simd<T>::W;
  Vec tv = Vec{};
  int64_t j0 = 0;
  for (; j0 + W <= n; j0 += W) {
    const Vec v = *reinterpret_cast<const U*>(x + j0);
    tv = v > tv ? v : tv;
  }
  T top = 0;
  for (int l = 0; l < W; ++l) top = tv[l] > top ? tv[l] : top;
  for (int64_t j = j0; j < n; ++j) top = x[j] > top ? x[j] : top;
  return top;
}

template <typename T>
__attribute__((always_inline)) inline T scaled_step_impl(int64_t m, int64_t n, const T* __restrict a,
                                                         const T* __restrict M, int64_t ld, const T* __restrict x,
                                                         T scale, T tiny_ratio, T* __restrict s, int64_t* tiny) {
  using Vec = typename Simd<T>::V;
  using U = typename Simd<T>::U;
  constexpr int W = Simd<T>::W;
  vecmat_impl(m, n, a, M, ld, s);
  Vec tv = Vec{};
  int64_t j0 = 0;
  for (; j0 + W <= n; j0 += W) {
    const Vec v = *reinterpret_cast<const U*>(s + j0) * (*reinterpret_cast<const U*>(x + j0) * scale);
    *reinterpret_cast<U*>(s + j0) = v;
    tv = v > tv ? v : tv;  // NaN never wins
  }
  T top = 0;
  for (int l = 0; l < W; ++l) top = tv[l] > top ? tv[l] : top;
  for (int64_t j = j0; j < n; ++j) {
    s[j] *= x[j] * scale;
    top = s[j] > top ? s[j] : top;
  }
  const T floor = top * tiny_ratio;
  // A count in lanes of T's width, so that the compare vectorises unwidened.
  typename Simd<T>::Lane count = 0;
  for (int64_t j = 0; j < n; ++j) count += (s[j] < floor) & (s[j] > 0);
  *tiny = count;
  return top;
}

template <typename T>
__attribute__((always_inline)) inline T backward_step_impl(int64_t n, const T* __restrict r, const T* __restrict a,
                                                           T g, T tiny, T* __restrict b, T* __restrict marg,
                                                           T* __restrict coef, int64_t* count) {
  using Vec = typename Simd<T>::V;
  using U = typename Simd<T>::U;
  constexpr int W = Simd<T>::W;
  const T top = max_or_zero(n, r);
  if (!(top > 0) || !(top <= std::numeric_limits<T>::max())) return 0;
  const T inv = 1 / top;
  // The sum W lanes at a time too: GCC does not reorder a floating sum by
  // itself, and as a scalar chain it costs as much as the step's mat-vec.
  Vec nv = Vec{};
  int64_t i0 = 0;
  for (; i0 + W <= n; i0 += W) {
    const Vec bv = *reinterpret_cast<const U*>(r + i0) * inv;
    *reinterpret_cast<U*>(b + i0) = bv;
    nv += *reinterpret_cast<const U*>(a + i0) * bv;
  }
  T norm = 0;
  for (int l = 0; l < W; ++l) norm += nv[l];
  for (int64_t i = i0; i < n; ++i) {
    b[i] = r[i] * inv;
    norm += a[i] * b[i];
  }
  typename Simd<T>::Lane small = 0;  // as in scaled_step_impl
  for (int64_t i = 0; i < n; ++i) small += (b[i] < tiny) & (b[i] > 0);
  *count = small;
  if (!(norm > 0)) return norm;
  const T inv_norm = 1 / norm;
  const T pair = g * inv_norm * inv;
  for (int64_t i = 0; i < n; ++i) {
    marg[i] = a[i] * b[i] * inv_norm;
    coef[i] = a[i] * pair;
  }
  return norm;
}

}  // namespace vmath_detail

// One step of a scaled forward recursion: s[j] = (sum_i a[i] M[i * ld + j]) *
// x[j] * scale for j < n. Returns max_j s[j]; *tiny counts the nonzero s[j]
// below tiny_ratio times that max.
FASTNLP_VECTOR_CLONES inline float scaled_step(int64_t m, int64_t n, const float* __restrict a,
                                               const float* __restrict M, int64_t ld, const float* __restrict x,
                                               float scale, float tiny_ratio, float* __restrict s, int64_t* tiny) {
  return vmath_detail::scaled_step_impl(m, n, a, M, ld, x, scale, tiny_ratio, s, tiny);
}
FASTNLP_VECTOR_CLONES inline double scaled_step(int64_t m, int64_t n, const double* __restrict a,
                                                const double* __restrict M, int64_t ld, const double* __restrict x,
                                                double scale, double tiny_ratio, double* __restrict s,
                                                int64_t* tiny) {
  return vmath_detail::scaled_step_impl(m, n, a, M, ld, x, scale, tiny_ratio, s, tiny);
}

// One step of a scaled backward recursion, from r[i] = sum_j E[i][j] q[j] and
// the forward row a at the same position: b[i] = r[i] / max r, marg[i] = a[i]
// b[i] / norm (the posterior), coef[i] = g a[i] / (norm max r) (the factor of
// the pairwise marginals), norm = sum_i a[i] b[i]. Returns norm (0 when there
// is no mass, NaN propagated); *count counts nonzero b[i] below tiny.
FASTNLP_VECTOR_CLONES inline float backward_step(int64_t n, const float* __restrict r, const float* __restrict a,
                                                 float g, float tiny, float* __restrict b, float* __restrict marg,
                                                 float* __restrict coef, int64_t* count) {
  return vmath_detail::backward_step_impl(n, r, a, g, tiny, b, marg, coef, count);
}
FASTNLP_VECTOR_CLONES inline double backward_step(int64_t n, const double* __restrict r, const double* __restrict a,
                                                  double g, double tiny, double* __restrict b,
                                                  double* __restrict marg, double* __restrict coef, int64_t* count) {
  return vmath_detail::backward_step_impl(n, r, a, g, tiny, b, marg, coef, count);
}

// G[i * ld + j] += c[i] * w[j]: a rank-one update, the pairwise marginals of
// one step before their shared factor E[i][j] is applied (once per call).
// Four rows at a time, so each w[j] is loaded once per four rows.
FASTNLP_VECTOR_CLONES inline void outer_accumulate(int64_t m, int64_t n, const double* __restrict c,
                                                   const double* __restrict w, int64_t ld, double* __restrict G) {
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    const double c0 = c[i], c1 = c[i + 1], c2 = c[i + 2], c3 = c[i + 3];
    double* g0 = G + i * ld;
    double* g1 = g0 + ld;
    double* g2 = g1 + ld;
    double* g3 = g2 + ld;
    for (int64_t j = 0; j < n; ++j) {
      const double wj = w[j];
      g0[j] += c0 * wj;
      g1[j] += c1 * wj;
      g2[j] += c2 * wj;
      g3[j] += c3 * wj;
    }
  }
  for (; i < m; ++i) {
    const double ci = c[i];
    double* out = G + i * ld;
    for (int64_t j = 0; j < n; ++j) out[j] += ci * w[j];
  }
}

// A small register-blocked matrix product for tiles held in caches: the
// attention kernel's tile products and the CRF's pairwise-marginal sums.
namespace tile_detail {

// The product works on a strip of R rows x 2 vectors of C at a time, R = 6
// where the rows allow (12 accumulators, two loads of B and six broadcasts of
// A per step of k: both FMA ports stay busy without spilling the 16 AVX2
// registers), 4 or 2 at the bottom of a tile. Tiles are padded to kRows rows.
constexpr int kRows = 4;

template <bool TransA, int R, typename T>
__attribute__((always_inline)) inline void gemm_strip(int64_t K, const T* __restrict a, int64_t lda,
                                                      const T* __restrict B, int64_t ldb, T* __restrict C,
                                                      int64_t ldc, bool accumulate) {
  using V = typename Simd<T>::V;
  using U = typename Simd<T>::U;
  constexpr int W = Simd<T>::W;
  V c[R][2];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v) c[r][v] = accumulate ? *reinterpret_cast<const U*>(C + r * ldc + v * W) : V{};
  for (int64_t k = 0; k < K; ++k) {
    V b[2];
    for (int v = 0; v < 2; ++v) b[v] = *reinterpret_cast<const U*>(B + k * ldb + v * W);
    for (int r = 0; r < R; ++r) {
      const T ar = TransA ? a[k * lda + r] : a[r * lda + k];
      for (int v = 0; v < 2; ++v) c[r][v] += ar * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < 2; ++v) *reinterpret_cast<U*>(C + r * ldc + v * W) = c[r][v];
}

// C[M x N] (+)= op(A) * B[K x N], all row major with leading dimensions lda,
// ldb, ldc; op(A) is A[M x K], or with TransA the transpose of A[K x M] (so
// the backward pass needs no transposed copies of its tiles). M must be a
// multiple of kRows and N of 2 * W: the kernel pads its tiles (with zeros
// where the padding enters a sum) so no edge code is needed.
template <bool TransA, typename T>
__attribute__((always_inline)) inline void gemm_impl(int64_t M, int64_t N, int64_t K, const T* __restrict A,
                                                     int64_t lda, const T* __restrict B, int64_t ldb,
                                                     T* __restrict C, int64_t ldc, bool accumulate) {
  constexpr int W = Simd<T>::W;
  for (int64_t j = 0; j < N; j += 2 * W) {
    int64_t i = 0;
    for (; i + 6 <= M; i += 6)
      gemm_strip<TransA, 6>(K, TransA ? A + i : A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    for (; i + 4 <= M; i += 4)
      gemm_strip<TransA, 4>(K, TransA ? A + i : A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
    for (; i + 2 <= M; i += 2)
      gemm_strip<TransA, 2>(K, TransA ? A + i : A + i * lda, lda, B + j, ldb, C + i * ldc + j, ldc, accumulate);
  }
}

}  // namespace tile_detail

// C (+)= A B.
FASTNLP_VECTOR_CLONES inline void tile_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                            const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  tile_detail::gemm_impl<false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
FASTNLP_VECTOR_CLONES inline void tile_gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                                            const double* B, int64_t ldb, double* C, int64_t ldc,
                                            bool accumulate) {
  tile_detail::gemm_impl<false>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
// C (+)= A^T B, A given as (K x M).
FASTNLP_VECTOR_CLONES inline void tile_gemm_at(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                               const float* B, int64_t ldb, float* C, int64_t ldc,
                                               bool accumulate) {
  tile_detail::gemm_impl<true>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}
FASTNLP_VECTOR_CLONES inline void tile_gemm_at(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda,
                                               const double* B, int64_t ldb, double* C, int64_t ldc,
                                               bool accumulate) {
  tile_detail::gemm_impl<true>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

// One Viterbi step over all K predecessors: best[j] = max_i (score[i] +
// trans[i][j]) + emission[j], summed in pytorch-crf's order, with arg[j] the
// lowest i that attains it (a candidate must be strictly greater to win, as
// with torch.max).
namespace maxplus_detail {

// Columns [j0, j0 + V * L): their running best and argmax stay in registers
// while the K rows of trans stream past, instead of a load and a store of
// both per row and column.
template <typename scalar_t, int V>
__attribute__((always_inline)) inline void columns(int64_t K, int64_t j0, const scalar_t* __restrict score,
                                                   const scalar_t* __restrict trans,
                                                   const scalar_t* __restrict emission, scalar_t* __restrict best,
                                                   int32_t* __restrict arg) {
  typedef typename Simd<scalar_t>::V vec;
  typedef typename Simd<scalar_t>::I ivec;
  constexpr int L = Simd<scalar_t>::W;
  vec e[V], b[V];
  ivec a[V];
  for (int v = 0; v < V; ++v) {
    vec row;
    __builtin_memcpy(&e[v], emission + j0 + v * L, sizeof(vec));
    __builtin_memcpy(&row, trans + j0 + v * L, sizeof(vec));
    b[v] = (score[0] + row) + e[v];
    a[v] = ivec{};
  }
  for (int64_t i = 1; i < K; ++i) {
    const scalar_t si = score[i];
    const scalar_t* r = trans + i * K + j0;
    const ivec from = ivec{} + static_cast<typename Simd<scalar_t>::Lane>(i);
    for (int v = 0; v < V; ++v) {
      vec row;
      __builtin_memcpy(&row, r + v * L, sizeof(vec));
      const vec c = (si + row) + e[v];
      const ivec better = c > b[v];  // all ones where the candidate wins; false for NaN
      b[v] = better ? c : b[v];
      a[v] = better ? from : a[v];
    }
  }
  for (int v = 0; v < V; ++v) {
    __builtin_memcpy(best + j0 + v * L, &b[v], sizeof(vec));
    for (int l = 0; l < L; ++l) arg[j0 + v * L + l] = static_cast<int32_t>(a[v][l]);
  }
}

// The same, one column at a time, for j in [j0, j1).
template <typename scalar_t>
__attribute__((always_inline)) inline void scalar_columns(int64_t K, int64_t j0, int64_t j1,
                                                          const scalar_t* __restrict score,
                                                          const scalar_t* __restrict trans,
                                                          const scalar_t* __restrict emission,
                                                          scalar_t* __restrict best, int32_t* __restrict arg) {
  for (int64_t j = j0; j < j1; ++j) {
    scalar_t b = (score[0] + trans[j]) + emission[j];
    int32_t a = 0;
    for (int64_t i = 1; i < K; ++i) {
      const scalar_t c = (score[i] + trans[i * K + j]) + emission[j];
      if (c > b) b = c, a = static_cast<int32_t>(i);
    }
    best[j] = b;
    arg[j] = a;
  }
}

template <typename scalar_t>
__attribute__((always_inline)) inline void step(int64_t K, const scalar_t* __restrict score,
                                                const scalar_t* __restrict trans,
                                                const scalar_t* __restrict emission, scalar_t* __restrict best,
                                                int32_t* __restrict arg) {
  constexpr int L = Simd<scalar_t>::W;
  int64_t j = 0;
  for (; j + 4 * L <= K; j += 4 * L) columns<scalar_t, 4>(K, j, score, trans, emission, best, arg);
  const int64_t rest = K - j;  // < 4 L
  if (rest == 0) return;
  // The rest as whole vectors ending at column K, recomputing a few columns
  // already done (they come out the same) -- possible when K has that many.
  const int64_t vectors = (rest + L - 1) / L;
  const int64_t from = K - vectors * L;
  if (from >= 0) {
    switch (vectors) {
      case 1: columns<scalar_t, 1>(K, from, score, trans, emission, best, arg); return;
      case 2: columns<scalar_t, 2>(K, from, score, trans, emission, best, arg); return;
      case 3: columns<scalar_t, 3>(K, from, score, trans, emission, best, arg); return;
      default: columns<scalar_t, 4>(K, from, score, trans, emission, best, arg); return;
    }
  }
  // K < vectors * L: here j == 0 and K < 4 L. Whole vectors, then single columns.
  switch (K / L) {
    case 0: break;
    case 1: columns<scalar_t, 1>(K, 0, score, trans, emission, best, arg); break;
    case 2: columns<scalar_t, 2>(K, 0, score, trans, emission, best, arg); break;
    default: columns<scalar_t, 3>(K, 0, score, trans, emission, best, arg); break;
  }
  scalar_columns(K, K / L * L, K, score, trans, emission, best, arg);
}

}  // namespace maxplus_detail

FASTNLP_VECTOR_CLONES inline void maxplus_step(int64_t K, const float* score, const float* trans,
                                               const float* emission, float* best, int32_t* arg) {
  maxplus_detail::step(K, score, trans, emission, best, arg);
}
FASTNLP_VECTOR_CLONES inline void maxplus_step(int64_t K, const double* score, const double* trans,
                                               const double* emission, double* best, int32_t* arg) {
  maxplus_detail::step(K, score, trans, emission, best, arg);
}

}  // namespace fastnlp
