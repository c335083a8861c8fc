// The loops behind few_rows_addmm_ (see few_rows_matmul.h), written on whole
// vectors (vector_loops.h) and compiled for AVX2+FMA and the baseline ISA.
// With one row on the left a product reads each element of the matrix on the
// right once: the loops are bound by those loads, so they keep the vector
// units fed from independent sums and read each element once for all rows.
#include "cpu/few_rows_matmul.h"

#include "cpu/vector_loops.h"

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

#pragma GCC diagnostic pop

}  // namespace

bool few_rows_addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  if (beta != 0.0 && beta != 1.0) return false;
  if (!out.is_cpu() || !a.is_cpu() || !b.is_cpu() || out.dim() != 2 || a.dim() != 2 || b.dim() != 2) return false;
  if (a.size(0) > kFewRowsMax) return false;  // first: most steps of a training batch stop here
  const at::ScalarType dtype = out.scalar_type();
  if ((dtype != at::kFloat && dtype != at::kDouble) || a.scalar_type() != dtype || b.scalar_type() != dtype)
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

}  // namespace fastnlp
