// Matrix products with one to a few rows on the left, for the per-step
// recurrent products of the LSTM time loop when few sequences are alive
// (B = 1 inference and decoding, the tails of packed batches).
//
// Why: MKL, which ATen calls for float32/float64 products on the CPU, takes
// a generic code path for these on AMD processors (mkl_blas_def_xsgemv in
// perf). Measured on the 2-core CI machine (AMD EPYC), one thread, W (1024,
// 256) float32, three such matrices in turn so that W comes from L3 as in
// the time loop, best of five runs, microseconds per product for M = 1, 2,
// 3, 4 rows:
//   h (M, 256) @ W^T   torch.mm 31.8 55.8 85.2 72.6   here 20.3 31.5 43.0 53.1
//   g (M, 1024) @ W    torch.mm 28.9 56.9 79.5 58.2   here 17.7 29.5 40.8 52.9
// (the loops here timed alone in C++, AVX2; torch.mm from Python, about 2 us
// of it the call). Beyond four rows MKL's GEMM catches up. The forward's
// products (W^T on the right) run AVX-512 loops where the CPU has them
// (few_rows_matmul.cpp says why they are faster); measured there from
// Python (one thread, medians, microseconds, about 2 of them the call),
// h (M, 256) @ W^T, W (1024, 256) in L2, M = 1 and 4: float32 19.1 and
// 50.8 with AVX2, 15.1 and 35.1 with AVX-512; a bfloat16 W 15.7 (M = 1)
// with AVX2, 8.4 and 24.4 with the bfloat16 dot product.
#pragma once

#include <ATen/ATen.h>

namespace fastnlp {

// Rows up to which few_rows_addmm_ takes a product.
constexpr int64_t kFewRowsMax = 4;

// out (M, N) = beta * out + a (M, K) @ b (K, N) for beta 0 or 1 (0: what out
// held is ignored, NaN included), on CPU float32/float64 tensors (or float32
// a and out with a bfloat16 b: a bfloat16 model's weight, read as it is, so
// that the loops read half the bytes) whose rows are contiguous (a, out, and
// either those of W = b^T, N a multiple of four, as for the forward's
// h W_hh^T, or b's, K a multiple of four, as for the backward's g W_hh) and
// with M <= kFewRowsMax. With a bfloat16 W = b^T, a is rounded to bfloat16,
// as every other product of the bfloat16 LSTM rounds its operands (see
// LstmStepKernels::product_dtype), and multiplied with the AVX-512 bfloat16
// dot product where the processor has it (cpu_has_bfloat16_dot); with a
// bfloat16 b read by rows (the backward's), a stays float32 and each weight
// element is widened.
// Returns false, touching nothing, for anything else: the caller then runs
// out.addmm_(a, b, beta). out must not overlap a or b (as for addmm_).
bool few_rows_addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta);

// As few_rows_addmm_, which calls it with allow_avx512 = true; false keeps
// the forward products (W^T on the right) on the AVX2 or portable loops
// where the processor has the AVX-512 ones, so that the tests can compare
// the two (fastnlp._C.few_rows_addmm_).
bool few_rows_addmm_with(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta, bool allow_avx512);

// Whether this processor (and its OS) runs AVX-512 (F and BW), which
// few_rows_addmm_ then uses for the forward products of a float32 weight.
bool cpu_has_avx512();

// Whether it has AVX-512's bfloat16 dot product (AVX512_BF16) too, which
// few_rows_addmm_ then uses for the forward products of a bfloat16 weight.
bool cpu_has_bfloat16_dot();

}  // namespace fastnlp
