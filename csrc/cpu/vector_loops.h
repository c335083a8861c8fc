// The innermost loops of the CPU kernels, written so the compiler vectorises
// them, and compiled twice (AVX2+FMA and the baseline ISA) with the right one
// picked at load time: a wheel built on one x86 machine stays portable while
// machines with AVX2 get 8-wide float loops.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTNLP_VECTOR_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define FASTNLP_VECTOR_CLONES
#endif

namespace fastnlp {

// y[j] += a * x[j]
FASTNLP_VECTOR_CLONES inline void axpy(int64_t n, float a, const float* __restrict x, float* __restrict y) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}
FASTNLP_VECTOR_CLONES inline void axpy(int64_t n, double a, const double* __restrict x, double* __restrict y) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

// y[j] += a * x[j] * z[j]
FASTNLP_VECTOR_CLONES inline void axpy_product(int64_t n, float a, const float* __restrict x,
                                               const float* __restrict z, float* __restrict y) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j] * z[j];
}
FASTNLP_VECTOR_CLONES inline void axpy_product(int64_t n, double a, const double* __restrict x,
                                               const double* __restrict z, double* __restrict y) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j] * z[j];
}

// One predecessor's contribution to a Viterbi step: candidate (a + row[j]) + emission[j]
// replaces best[j] (and records `from` as its argmax) only when strictly
// greater, so the lowest predecessor index wins ties, as torch.max does.
FASTNLP_VECTOR_CLONES inline void maxplus_update(int64_t n, float a, const float* __restrict row,
                                                 const float* __restrict emission, int32_t from,
                                                 float* __restrict best, int32_t* __restrict arg) {
  for (int64_t j = 0; j < n; ++j) {
    const float v = (a + row[j]) + emission[j];
    const bool better = v > best[j];
    best[j] = better ? v : best[j];
    arg[j] = better ? from : arg[j];
  }
}
FASTNLP_VECTOR_CLONES inline void maxplus_update(int64_t n, double a, const double* __restrict row,
                                                 const double* __restrict emission, int32_t from,
                                                 double* __restrict best, int32_t* __restrict arg) {
  for (int64_t j = 0; j < n; ++j) {
    const double v = (a + row[j]) + emission[j];
    const bool better = v > best[j];
    best[j] = better ? v : best[j];
    arg[j] = better ? from : arg[j];
  }
}

}  // namespace fastnlp
