// The loops behind few_rows_addmm_ (see few_rows_matmul.h), written on whole
// vectors (vector_loops.h) and compiled for AVX2+FMA and the baseline ISA,
// and, for the forward's products, AVX-512 loops written with its
// intrinsics (at the end).
// With one row on the left a product reads each element of the matrix on the
// right once: the loops are bound by those loads, so they keep the vector
// units fed from independent sums and read each element once for all rows.
#include "cpu/few_rows_matmul.h"

#include "cpu/vector_loops.h"

#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

namespace fastnlp {
namespace {

// (Inlined, so the ABI note GCC gives for passing 32-byte vectors around in
// the baseline-ISA clones concerns no real call; see csrc/cpu/lstm.cpp.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

template <typename scalar_t>
using Vec = typename Simd<scalar_t>::V;

template <typename scalar_t>
__attribute__((always_inline)) inline Vec<scalar_t> load_vec(const scalar_t* p) {
  Vec<scalar_t> v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <typename scalar_t>
__attribute__((always_inline)) inline void store_vec(scalar_t* p, const Vec<scalar_t>& v) {
  __builtin_memcpy(p, &v, sizeof v);
}

template <typename scalar_t>
__attribute__((always_inline)) inline scalar_t lane_sum(const Vec<scalar_t>& v) {
  scalar_t total = 0;
  for (int lane = 0; lane < Simd<scalar_t>::W; ++lane) total += v[lane];
  return total;
}

// out[r] (+)= sum_k a[k] * w[r * ldw + k] for r < 4: four dot products at
// once, each vector of a loaded once for all four, four independent sums in
// flight.
template <typename scalar_t>
__attribute__((always_inline)) inline void four_dot_products(int64_t K, const scalar_t* a, const scalar_t* w,
                                                             int64_t ldw, scalar_t* out, bool accumulate) {
  constexpr int L = Simd<scalar_t>::W;
  Vec<scalar_t> sums[4] = {};
  int64_t k = 0;
  for (; k + L <= K; k += L) {
    const Vec<scalar_t> x = load_vec(a + k);
    for (int r = 0; r < 4; ++r) sums[r] += load_vec(w + r * ldw + k) * x;
  }
  for (int r = 0; r < 4; ++r) {
    scalar_t total = lane_sum<scalar_t>(sums[r]);
    for (int64_t j = k; j < K; ++j) total += w[r * ldw + j] * a[j];
    out[r] = accumulate ? out[r] + total : total;
  }
}

// out (M, N) (+)= a (M, K) @ w^T, w (N, K) with rows ldw apart, N a multiple
// of four: four rows of w at a time (read from L1 again for each row of a).
template <typename scalar_t>
__attribute__((always_inline)) inline void transposed_product(int64_t M, int64_t N, int64_t K, const scalar_t* a,
                                                              int64_t lda, const scalar_t* w, int64_t ldw,
                                                              scalar_t* out, int64_t ldo, bool accumulate) {
  for (int64_t n = 0; n < N; n += 4)
    for (int64_t m = 0; m < M; ++m)
      four_dot_products<scalar_t>(K, a + m * lda, w + n * ldw, ldw, out + m * ldo + n, accumulate);
}

// out (M, N) (+)= a (M, K) @ b (K, N), b with rows ldb apart, K a multiple
// of four: b's rows are swept in order, four at a time, and each row of out
// (in L1) takes their multiples by its a[m][k] in one pass. (Strips of out's
// columns held in registers read b with a stride instead, and measured 25 us
// against 19 us for a (1, 1024) @ (1024, 256) product out of L3.)
template <typename scalar_t>
__attribute__((always_inline)) inline void plain_product(int64_t M, int64_t N, int64_t K, const scalar_t* a,
                                                         int64_t lda, const scalar_t* b, int64_t ldb, scalar_t* out,
                                                         int64_t ldo, bool accumulate) {
  constexpr int L = Simd<scalar_t>::W;
  if (!accumulate)
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) out[m * ldo + n] = 0;
  for (int64_t k = 0; k < K; k += 4) {
    const scalar_t* b0 = b + k * ldb;
    const scalar_t* b1 = b0 + ldb;
    const scalar_t* b2 = b1 + ldb;
    const scalar_t* b3 = b2 + ldb;
    for (int64_t m = 0; m < M; ++m) {
      const scalar_t* x = a + m * lda + k;
      scalar_t* o = out + m * ldo;
      // a[m][k..k+3], each in every lane
      const Vec<scalar_t> x0 = Vec<scalar_t>{} + x[0], x1 = Vec<scalar_t>{} + x[1];
      const Vec<scalar_t> x2 = Vec<scalar_t>{} + x[2], x3 = Vec<scalar_t>{} + x[3];
      int64_t n = 0;
      for (; n + L <= N; n += L)
        store_vec(o + n, load_vec(o + n) + x0 * load_vec(b0 + n) + x1 * load_vec(b1 + n) + x2 * load_vec(b2 + n) +
                             x3 * load_vec(b3 + n));
      for (; n < N; ++n) o[n] += x[0] * b0[n] + x[1] * b1[n] + x[2] * b2[n] + x[3] * b3[n];
    }
  }
}

// One clone pair per scalar type and layout (target_clones takes no templates).
#define FASTNLP_FEW_ROWS_KERNELS(scalar_t)                                                                    \
  FASTNLP_VECTOR_CLONES void transposed_kernel(int64_t M, int64_t N, int64_t K, const scalar_t* a, int64_t lda, \
                                               const scalar_t* w, int64_t ldw, scalar_t* out, int64_t ldo,      \
                                               bool accumulate) {                                              \
    transposed_product<scalar_t>(M, N, K, a, lda, w, ldw, out, ldo, accumulate);                               \
  }                                                                                                            \
  FASTNLP_VECTOR_CLONES void plain_kernel(int64_t M, int64_t N, int64_t K, const scalar_t* a, int64_t lda,      \
                                          const scalar_t* b, int64_t ldb, scalar_t* out, int64_t ldo,           \
                                          bool accumulate) {                                                   \
    plain_product<scalar_t>(M, N, K, a, lda, b, ldb, out, ldo, accumulate);                                    \
  }
FASTNLP_FEW_ROWS_KERNELS(float)
FASTNLP_FEW_ROWS_KERNELS(double)
#undef FASTNLP_FEW_ROWS_KERNELS

// float32 rows times a bfloat16 weight (a bfloat16 model's). A bfloat16 is
// the high half of the float32 with the same bits, so a weight element is
// widened exactly by moving it to the high half. Read as 32-bit words, each
// holding a pair of neighbours (element 2j in the low half, 2j + 1 in the
// high), the pairs split into the even elements (shifted up) and the odd
// ones (low halves cleared) with no shuffles; the other operand is then taken
// split the same way. (Widening eight elements at a time in order took GCC
// three shuffles each and ran slower than the float32 loops.)
typedef uint32_t Words __attribute__((vector_size(32)));

__attribute__((always_inline)) inline void load_pairs(const c10::BFloat16* p, Vec<float>& even, Vec<float>& odd) {
  Words words;
  __builtin_memcpy(&words, p, sizeof words);
  const Words low = words << 16, high = words & 0xffff0000u;
  __builtin_memcpy(&even, &low, sizeof even);
  __builtin_memcpy(&odd, &high, sizeof odd);
}

constexpr int kPairLanes = Simd<float>::W;  // pairs per vector of words: 16 elements
constexpr int64_t kPairBlock = 2 * kPairLanes;

// x rounded to bfloat16 (to nearest, ties to even, as torch rounds) and
// widened back.
__attribute__((always_inline)) inline float rounded(float x) {
  return static_cast<float>(c10::BFloat16(x));
}

// x (n) rounded, split into its even and odd elements over the whole blocks
// of kPairBlock: even[j] = x[2j], odd[j] = x[2j + 1], j < n / kPairBlock *
// kPairLanes.
__attribute__((always_inline)) inline void split_rounded_pairs(int64_t n, const float* x, float* even, float* odd) {
  for (int64_t j = 0; j < n / kPairBlock * kPairLanes; ++j) {
    even[j] = rounded(x[2 * j]);
    odd[j] = rounded(x[2 * j + 1]);
  }
}

// out (M, N) (+)= round(a) (M, K) @ w^T, w (N, K) bfloat16 with rows ldw
// apart, N a multiple of four: as transposed_product, on a's rows rounded to
// bfloat16 and split into pairs (scratch: K floats per row). The portable
// form of transposed_kernel_bfloat16_dot below, with the same rounding.
FASTNLP_VECTOR_CLONES void transposed_kernel_bfloat16(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                                                      const c10::BFloat16* w, int64_t ldw, float* out, int64_t ldo,
                                                      bool accumulate, float* scratch) {
  const int64_t blocks = K / kPairBlock, half = blocks * kPairLanes;
  for (int64_t m = 0; m < M; ++m)
    split_rounded_pairs(K, a + m * lda, scratch + 2 * m * half, scratch + (2 * m + 1) * half);
  for (int64_t n = 0; n < N; n += 4) {
    for (int64_t m = 0; m < M; ++m) {
      const float* even = scratch + 2 * m * half;
      const float* odd = even + half;
      const float* x = a + m * lda;
      Vec<float> sums[4] = {};
      for (int64_t j = 0; j < half; j += kPairLanes) {
        const Vec<float> xe = load_vec(even + j), xo = load_vec(odd + j);
        for (int r = 0; r < 4; ++r) {
          Vec<float> we, wo;
          load_pairs(w + (n + r) * ldw + 2 * j, we, wo);
          sums[r] += we * xe + wo * xo;
        }
      }
      for (int r = 0; r < 4; ++r) {
        float total = lane_sum<float>(sums[r]);
        for (int64_t k = 2 * half; k < K; ++k) total += static_cast<float>(w[(n + r) * ldw + k]) * rounded(x[k]);
        float* o = out + m * ldo + n + r;
        *o = accumulate ? *o + total : total;
      }
    }
  }
}

// out (M, N) (+)= a (M, K) @ b (K, N), b bfloat16 with rows ldb apart, K a
// multiple of four: as plain_product, with out's rows held split into pairs
// (scratch: N floats per row) and put back together at the end.
FASTNLP_VECTOR_CLONES void plain_kernel_bfloat16(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                                                 const c10::BFloat16* b, int64_t ldb, float* out, int64_t ldo,
                                                 bool accumulate, float* scratch) {
  const int64_t half = N / kPairBlock * kPairLanes;  // pairs in whole blocks; the rest of the row goes to out
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t j = 0; j < 2 * half; ++j) scratch[m * 2 * half + j] = 0;
    if (!accumulate)
      for (int64_t n = 2 * half; n < N; ++n) out[m * ldo + n] = 0;
  }
  for (int64_t k = 0; k < K; k += 4) {
    const c10::BFloat16* b0 = b + k * ldb;
    const c10::BFloat16* b1 = b0 + ldb;
    const c10::BFloat16* b2 = b1 + ldb;
    const c10::BFloat16* b3 = b2 + ldb;
    for (int64_t m = 0; m < M; ++m) {
      const float* x = a + m * lda + k;
      float* even = scratch + m * 2 * half;
      float* odd = even + half;
      const Vec<float> x0 = Vec<float>{} + x[0], x1 = Vec<float>{} + x[1];
      const Vec<float> x2 = Vec<float>{} + x[2], x3 = Vec<float>{} + x[3];
      for (int64_t j = 0; j < half; j += kPairLanes) {
        Vec<float> e0, o0, e1, o1, e2, o2, e3, o3;
        load_pairs(b0 + 2 * j, e0, o0);
        load_pairs(b1 + 2 * j, e1, o1);
        load_pairs(b2 + 2 * j, e2, o2);
        load_pairs(b3 + 2 * j, e3, o3);
        store_vec(even + j, load_vec(even + j) + x0 * e0 + x1 * e1 + x2 * e2 + x3 * e3);
        store_vec(odd + j, load_vec(odd + j) + x0 * o0 + x1 * o1 + x2 * o2 + x3 * o3);
      }
      float* o = out + m * ldo;
      for (int64_t n = 2 * half; n < N; ++n)
        o[n] += x[0] * static_cast<float>(b0[n]) + x[1] * static_cast<float>(b1[n]) +
                x[2] * static_cast<float>(b2[n]) + x[3] * static_cast<float>(b3[n]);
    }
  }
  for (int64_t m = 0; m < M; ++m) {
    const float* even = scratch + m * 2 * half;
    const float* odd = even + half;
    float* o = out + m * ldo;
    for (int64_t j = 0; j < half; ++j) {
      o[2 * j] = accumulate ? o[2 * j] + even[j] : even[j];
      o[2 * j + 1] = accumulate ? o[2 * j + 1] + odd[j] : odd[j];
    }
  }
}

#pragma GCC diagnostic pop

#if defined(__x86_64__) && defined(__GNUC__)
// The same products on AVX-512, compiled for it alone and called only where
// the processor has it (cpu_has_avx512, cpu_has_bfloat16_dot): a float32
// weight's with fused multiply-adds, a bfloat16 weight's with the bfloat16
// dot-product instruction (vdpbf16ps: sixteen float32 sums, each adding the
// products of one pair of neighbouring bfloat16 elements from each operand;
// the pairs lie along K, as a weight's rows and a's rows hold them, so both
// are read as they are, a's rows once rounded to bfloat16). Sixteen rows of
// w at a time keep sixteen sums in flight, where the AVX2 loops above keep
// four and wait on each sum's latency, and the bfloat16 instruction makes
// 32 products where the AVX2 loop spends five instructions on sixteen.
// (vdpbf16ps takes subnormal operands as zeros and flushes subnormal sums
// to zero: magnitudes below 1.2e-38, which the portable loop keeps.)
#define FASTNLP_AVX512_TARGET __attribute__((target("avx512f,avx512bw")))
#define FASTNLP_BFLOAT16_DOT_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// One level of the reductions below, on 128-bit lanes L0..L3: u and v each
// hold partial sums of `rows` rows (1: all four lanes; 2: L0 L1 and L2 L3),
// and the result holds both vectors' rows with half as many partial sums
// each: [u's (L0 L1) v's (L2 L3)] for rows = 1, a lane per row for rows = 2.
// (The zero-masked shuffles: the plain ones start from _mm512_undefined_ps,
// which GCC 12 warns of as uninitialised.)
FASTNLP_AVX512_TARGET inline __m512 add_lane_halves(__m512 u, __m512 v, int rows) {
  constexpr __mmask16 all = 0xffff;
  if (rows == 1)  // [u.L0 u.L1 v.L0 v.L1] + [u.L2 u.L3 v.L2 v.L3]
    return _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, u, v, 0x44), _mm512_maskz_shuffle_f32x4(all, u, v, 0xee));
  // [u.L0 u.L2 v.L0 v.L2] + [u.L1 u.L3 v.L1 v.L3]
  return _mm512_add_ps(_mm512_maskz_shuffle_f32x4(all, u, v, 0x88), _mm512_maskz_shuffle_f32x4(all, u, v, 0xdd));
}

// The same inside each 128-bit lane, whose four elements hold partial sums
// of one row (rows = 1) or of two, two each (rows = 2): [u0 u1 v0 v1] +
// [u2 u3 v2 v3] for rows = 1, [u0 u2 v0 v2] + [u1 u3 v1 v3] for rows = 2.
FASTNLP_AVX512_TARGET inline __m512 add_element_halves(__m512 u, __m512 v, int rows) {
  if (rows == 1) return _mm512_add_ps(_mm512_shuffle_ps(u, v, 0x44), _mm512_shuffle_ps(u, v, 0xee));
  return _mm512_add_ps(_mm512_shuffle_ps(u, v, 0x88), _mm512_shuffle_ps(u, v, 0xdd));
}

// out[r] (+)= the sum of sums[r]'s sixteen lanes, r < R (R = 4 or 16). Four
// levels of pairwise halving leave row 4q + j in lane 4j + q; one
// permutation puts it in lane 4q + j.
template <int R>
FASTNLP_AVX512_TARGET inline void store_row_sums(const __m512 (&sums)[R], float* out, bool accumulate) {
  __m512 two[R / 2], four[R / 4], eight[2];
  for (int i = 0; i < R / 2; ++i) two[i] = add_lane_halves(sums[2 * i], sums[2 * i + 1], 1);
  for (int i = 0; i < R / 4; ++i) four[i] = add_lane_halves(two[2 * i], two[2 * i + 1], 2);
  // four[i]: 128-bit lane j holds four partial sums of row 4i + j.
  if constexpr (R == 16) {
    eight[0] = add_element_halves(four[0], four[1], 1);
    eight[1] = add_element_halves(four[2], four[3], 1);
  } else {
    eight[0] = eight[1] = add_element_halves(four[0], four[0], 1);  // each row twice; the copies are ignored
  }
  const __m512 sixteen = add_element_halves(eight[0], eight[1], 2);
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512 result = _mm512_maskz_permutexvar_ps(0xffff, order, sixteen);  // (zero-masked: as above)
  const __mmask16 rows = static_cast<__mmask16>((uint32_t{1} << R) - 1);
  if (accumulate) result = _mm512_add_ps(result, _mm512_maskz_loadu_ps(rows, out));
  _mm512_mask_storeu_ps(out, rows, result);
}

// out[r] (+)= sum_k x[k] * w[r * ldw + k] for r < R: float32, sixteen
// elements of K per vector, ...
template <int R>
FASTNLP_AVX512_TARGET void dot_products(int64_t K, const float* x, const float* w, int64_t ldw, float* out,
                                        bool accumulate) {
  __m512 sums[R];
  for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m512 xk = _mm512_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) sums[r] = _mm512_fmadd_ps(xk, _mm512_loadu_ps(w + r * ldw + k), sums[r]);
  }
  if (k < K) {  // the last K - k < 16 elements; the rest of the vectors reads as zeros
    const __mmask16 tail = static_cast<__mmask16>((uint32_t{1} << (K - k)) - 1);
    const __m512 xk = _mm512_maskz_loadu_ps(tail, x + k);
    for (int r = 0; r < R; ++r) sums[r] = _mm512_fmadd_ps(xk, _mm512_maskz_loadu_ps(tail, w + r * ldw + k), sums[r]);
  }
  store_row_sums<R>(sums, out, accumulate);
}

// ... and bfloat16, 32 per vector.
template <int R>
FASTNLP_BFLOAT16_DOT_TARGET void dot_products(int64_t K, const c10::BFloat16* x, const c10::BFloat16* w,
                                              int64_t ldw, float* out, bool accumulate) {
  __m512 sums[R];
  for (int r = 0; r < R; ++r) sums[r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512bh xk = (__m512bh)_mm512_loadu_si512(x + k);
    for (int r = 0; r < R; ++r) sums[r] = _mm512_dpbf16_ps(sums[r], xk, (__m512bh)_mm512_loadu_si512(w + r * ldw + k));
  }
  if (k < K) {  // the last K - k < 32 elements; the rest of the vectors reads as zeros
    const __mmask32 tail = static_cast<__mmask32>((uint32_t{1} << (K - k)) - 1);
    const __m512bh xk = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + k);
    for (int r = 0; r < R; ++r)
      sums[r] = _mm512_dpbf16_ps(sums[r], xk, (__m512bh)_mm512_maskz_loadu_epi16(tail, w + r * ldw + k));
  }
  store_row_sums<R>(sums, out, accumulate);
}

// out (M, N) (+)= x (M, K, rows ldx apart) @ w^T, w (N, K) with rows ldw
// apart, N a multiple of four: sixteen rows of w at a time, then four, each
// block for every row of x while it is in L1.
template <typename Element>
void transposed_rows_avx512(int64_t M, int64_t N, int64_t K, const Element* x, int64_t ldx, const Element* w,
                            int64_t ldw, float* out, int64_t ldo, bool accumulate) {
  int64_t n = 0;
  for (; n + 16 <= N; n += 16)
    for (int64_t m = 0; m < M; ++m) dot_products<16>(K, x + m * ldx, w + n * ldw, ldw, out + m * ldo + n, accumulate);
  for (; n < N; n += 4)
    for (int64_t m = 0; m < M; ++m) dot_products<4>(K, x + m * ldx, w + n * ldw, ldw, out + m * ldo + n, accumulate);
}

// out (M, N) (+)= round(a) (M, K) @ w^T as transposed_kernel_bfloat16, on
// the bfloat16 dot product (scratch: K bfloat16 per row of a).
void transposed_kernel_bfloat16_dot(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda,
                                    const c10::BFloat16* w, int64_t ldw, float* out, int64_t ldo, bool accumulate,
                                    c10::BFloat16* scratch) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) scratch[m * K + k] = c10::BFloat16(a[m * lda + k]);
  transposed_rows_avx512(M, N, K, static_cast<const c10::BFloat16*>(scratch), K, w, ldw, out, ldo, accumulate);
}
#define FASTNLP_HAS_AVX512_KERNELS 1
#endif

}  // namespace

bool cpu_has_avx512() {
#ifdef FASTNLP_HAS_AVX512_KERNELS
  // libgcc's test, which also asks the OS whether it saves the AVX-512 registers.
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  return has;
#else
  return false;
#endif
}

bool cpu_has_bfloat16_dot() {
#ifdef FASTNLP_HAS_AVX512_KERNELS
  static const bool has = cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
  return has;
#else
  return false;
#endif
}

bool few_rows_addmm_with(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta,
                         bool allow_avx512) {
  if (beta != 0.0 && beta != 1.0) return false;
  if (!out.is_cpu() || !a.is_cpu() || !b.is_cpu() || out.dim() != 2 || a.dim() != 2 || b.dim() != 2) return false;
  if (a.size(0) > kFewRowsMax) return false;  // first: most steps of a training batch stop here
  const at::ScalarType dtype = out.scalar_type();
  // b in a's dtype, or a bfloat16 weight with float32 rows.
  const bool bfloat16_weight = dtype == at::kFloat && b.scalar_type() == at::kBFloat16;
  if ((dtype != at::kFloat && dtype != at::kDouble) || a.scalar_type() != dtype ||
      (b.scalar_type() != dtype && !bfloat16_weight))
    return false;
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (b.size(0) != K || out.size(0) != M || out.size(1) != N) return false;
  // Rows of a and out contiguous, out's rows apart (no row written twice).
  if (a.stride(1) != 1 || out.stride(1) != 1 || (M > 1 && out.stride(0) < N)) return false;
  // b = W^T with W's rows contiguous, four of them at a time; or b's rows
  // contiguous, four at a time. (4H, the gates, is a multiple of four.)
  const bool transposed = b.stride(0) == 1 && N % 4 == 0;
  const bool plain = !transposed && b.stride(1) == 1 && K % 4 == 0;
  if (!transposed && !plain) return false;
  if (M == 0 || N == 0) return true;
  const bool accumulate = beta == 1.0;
#ifdef FASTNLP_HAS_AVX512_KERNELS
  // The forward's products (W^T on the right) of a float32 row block by a
  // float32 or bfloat16 weight, where this CPU has the AVX-512 for it.
  const bool has_avx512_loop = bfloat16_weight ? cpu_has_bfloat16_dot() : dtype == at::kFloat && cpu_has_avx512();
  if (transposed && allow_avx512 && has_avx512_loop) {
    const float* a_data = a.const_data_ptr<float>();
    float* out_data = out.mutable_data_ptr<float>();
    if (bfloat16_weight)
      transposed_kernel_bfloat16_dot(M, N, K, a_data, a.stride(0), b.const_data_ptr<c10::BFloat16>(), b.stride(1),
                                     out_data, out.stride(0), accumulate, std::vector<c10::BFloat16>(M * K).data());
    else
      transposed_rows_avx512(M, N, K, a_data, a.stride(0), b.const_data_ptr<float>(), b.stride(1), out_data,
                             out.stride(0), accumulate);
    return true;
  }
#endif
  if (bfloat16_weight) {
    const float* a_data = a.const_data_ptr<float>();
    const c10::BFloat16* b_data = b.const_data_ptr<c10::BFloat16>();
    float* out_data = out.mutable_data_ptr<float>();
    if (transposed)
      transposed_kernel_bfloat16(M, N, K, a_data, a.stride(0), b_data, b.stride(1), out_data, out.stride(0),
                                 accumulate, std::vector<float>(M * K).data());
    else
      plain_kernel_bfloat16(M, N, K, a_data, a.stride(0), b_data, b.stride(0), out_data, out.stride(0), accumulate,
                            std::vector<float>(M * N).data());
    return true;
  }
  AT_DISPATCH_FLOATING_TYPES(dtype, "few_rows_addmm_", [&] {
    const scalar_t* a_data = a.const_data_ptr<scalar_t>();
    const scalar_t* b_data = b.const_data_ptr<scalar_t>();
    scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
    if (transposed)
      transposed_kernel(M, N, K, a_data, a.stride(0), b_data, b.stride(1), out_data, out.stride(0), accumulate);
    else
      plain_kernel(M, N, K, a_data, a.stride(0), b_data, b.stride(0), out_data, out.stride(0), accumulate);
  });
  return true;
}

bool few_rows_addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  return few_rows_addmm_with(out, a, b, beta, /*allow_avx512=*/true);
}

}  // namespace fastnlp
