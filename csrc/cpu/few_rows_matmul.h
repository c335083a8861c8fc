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
// of it the call). Beyond four rows MKL's GEMM catches up.
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
// dot product where the processor has it; with a bfloat16 b read by rows
// (the backward's), a stays float32 and each weight element is widened.
// Returns false, touching nothing, for anything else: the caller then runs
// out.addmm_(a, b, beta). out must not overlap a or b (as for addmm_).
bool few_rows_addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta);

// As few_rows_addmm_, which calls it with allow_bfloat16_dot = true; false
// keeps a bfloat16 weight's forward products (W^T on the right) on the
// portable loop where the processor has the AVX-512 bfloat16 one, so that
// the tests can compare the two (fastnlp._C.few_rows_addmm_).
bool few_rows_addmm_with(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta,
                         bool allow_bfloat16_dot);

// Whether this processor (and its OS) runs AVX-512 with the bfloat16 dot
// product (AVX512_BF16), which few_rows_addmm_ then uses for a bfloat16
// weight's forward products.
bool cpu_has_bfloat16_dot();

}  // namespace fastnlp
