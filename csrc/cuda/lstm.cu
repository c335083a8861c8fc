// CUDA kernels for the LSTM pointwise steps (semantics: lstm.h here and
// csrc/lstm.h; csrc/cpu/lstm.cpp is the same math on the CPU).
//
// Layout of the work: one thread per (row, unit j), flattened to u = r * H + j
// and walked with a grid-stride loop. Consecutive threads take consecutive j,
// so each of the four gate blocks and every (rows, H) tensor is read and
// written in coalesced runs. Units are independent, so there is no shared
// memory and no synchronisation.
//
// A step reads and writes 12 to 15 values per unit and evaluates at most five
// exp/tanh, so it is bound by memory traffic; that is why the full-accuracy
// expf/tanhf are used rather than the __expf intrinsics: they should cost
// nothing measurable here and keep float32 close to the CPU kernel's
// correctly rounded results.
//
// The per-unit functions are __host__ __device__ so that the arithmetic and
// the index mapping can be exercised on a machine without a GPU.

#include "lstm.h"

#include <cmath>
#include <cstdint>

namespace fastnlp {
namespace cuda_impl {
namespace {

constexpr int kThreads = 256;
// More threads than any current GPU keeps resident (an H100 holds 132 SMs *
// 2048); past that, threads loop instead of launching ever larger grids.
constexpr int64_t kMaxBlocks = 8192;
// rows * H up to 2^60 keeps every index below, r * 4H + 3H + j < 2^62, and
// the grid-stride increment far from overflowing int64.
constexpr int64_t kMaxUnits = int64_t(1) << 60;

// The arithmetic type: double for double, float for everything else.
template <typename T>
struct Compute {
  using type = float;
};
template <>
struct Compute<double> {
  using type = double;
};
template <typename T>
using compute_t = typename Compute<T>::type;

// Loads widen to the arithmetic type, stores round to nearest once.
__host__ __device__ __forceinline__ float load(const float* p) { return *p; }
__host__ __device__ __forceinline__ double load(const double* p) { return *p; }
__host__ __device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__host__ __device__ __forceinline__ float load(const __nv_bfloat16* p) { return __bfloat162float(*p); }

__host__ __device__ __forceinline__ void store(float* p, float v) { *p = v; }
__host__ __device__ __forceinline__ void store(double* p, double v) { *p = v; }
__host__ __device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }
__host__ __device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Saturation is exact and NaN-free: for x -> -inf, exp(-x) overflows to +inf
// and 1 / (1 + inf) = 0; for x -> +inf, exp(-x) underflows to 0 and the
// result is 1. tanhf/tanh return exactly +-1 at large |x|.
__host__ __device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + ::expf(-x)); }
__host__ __device__ __forceinline__ double sigmoid(double x) { return 1.0 / (1.0 + ::exp(-x)); }
__host__ __device__ __forceinline__ float tanh_(float x) { return ::tanhf(x); }
__host__ __device__ __forceinline__ double tanh_(double x) { return ::tanh(x); }

template <typename T>
struct ForwardArgs {
  T* gates;    // (rows, 4H), in place
  T* c_state;  // (rows, H), in place
  T* cells;    // (rows, H)
  T* h_out;    // (rows, H)
  T* h_state;  // (rows, H) or nullptr
  int64_t rows;
  int64_t H;
};

template <typename T>
struct BackwardArgs {
  const T* gates;       // (rows, 4H) activations
  const T* cells;       // (rows, H)
  const T* c_prev;      // (rows_with_prev, H)
  int64_t rows_with_prev;
  const T* c0;          // (>= rows, H)
  const T* dh_a;        // (rows, H)
  const T* dh_b;        // (rows, H) or nullptr
  T* dc_state;          // (rows, H), in place
  T* grad_gates;        // (rows, 4H)
  T* h_tilde;           // (rows, H) or nullptr
  int64_t rows;
  int64_t H;
};

template <typename T>
__host__ __device__ __forceinline__ void forward_unit(const ForwardArgs<T>& a, int64_t r, int64_t j) {
  using acc_t = compute_t<T>;
  const int64_t H = a.H;
  T* g = a.gates + r * 4 * H + j;
  const int64_t k = r * H + j;
  const acc_t i = sigmoid(load(g));
  const acc_t f = sigmoid(load(g + H));
  const acc_t gg = tanh_(load(g + 2 * H));
  const acc_t o = sigmoid(load(g + 3 * H));
  // c and h come from the unrounded activations, as on the CPU; only the
  // stored copies are rounded.
  const acc_t c = f * load(a.c_state + k) + i * gg;
  const acc_t h = o * tanh_(c);
  store(g, i);
  store(g + H, f);
  store(g + 2 * H, gg);
  store(g + 3 * H, o);
  store(a.c_state + k, c);
  store(a.cells + k, c);
  store(a.h_out + k, h);
  if (a.h_state != nullptr) store(a.h_state + k, h);
}

template <typename T>
__host__ __device__ __forceinline__ void backward_unit(const BackwardArgs<T>& a, int64_t r, int64_t j) {
  using acc_t = compute_t<T>;
  const int64_t H = a.H;
  const T* g = a.gates + r * 4 * H + j;
  const int64_t k = r * H + j;
  const acc_t i = load(g), f = load(g + H), gg = load(g + 2 * H), o = load(g + 3 * H);
  const acc_t tc = tanh_(load(a.cells + k));
  acc_t dh = load(a.dh_a + k);
  if (a.dh_b != nullptr) dh += load(a.dh_b + k);
  // A row whose first step this is has no saved c_{t-1}: it starts from c0.
  const acc_t c_prev = r < a.rows_with_prev ? load(a.c_prev + k) : load(a.c0 + k);
  const acc_t one = 1;
  const acc_t dc = load(a.dc_state + k) + dh * o * (one - tc * tc);
  T* dg = a.grad_gates + r * 4 * H + j;
  store(dg, dc * gg * i * (one - i));
  store(dg + H, dc * c_prev * f * (one - f));
  store(dg + 2 * H, dc * i * (one - gg * gg));
  store(dg + 3 * H, dh * tc * o * (one - o));
  store(a.dc_state + k, dc * f);
  if (a.h_tilde != nullptr) store(a.h_tilde + k, o * tc);
}

// The units that the thread starting at `first` covers with step `stride`.
template <typename T>
__host__ __device__ __forceinline__ void forward_units(const ForwardArgs<T>& a, int64_t first, int64_t stride) {
  const int64_t units = a.rows * a.H;
  for (int64_t u = first; u < units; u += stride) forward_unit(a, u / a.H, u % a.H);
}

template <typename T>
__host__ __device__ __forceinline__ void backward_units(const BackwardArgs<T>& a, int64_t first, int64_t stride) {
  const int64_t units = a.rows * a.H;
  for (int64_t u = first; u < units; u += stride) backward_unit(a, u / a.H, u % a.H);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_forward_kernel(const ForwardArgs<T> a) {
  forward_units(a, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                static_cast<int64_t>(gridDim.x) * blockDim.x);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_backward_kernel(const BackwardArgs<T> a) {
  backward_units(a, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                 static_cast<int64_t>(gridDim.x) * blockDim.x);
}

bool sizes_ok(int64_t rows, int64_t H) { return rows >= 0 && H >= 0 && (H == 0 || rows <= kMaxUnits / H); }

unsigned grid_blocks(int64_t units) {
  const int64_t blocks = (units + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename T>
cudaError_t launch_forward(T* gates, T* c_state, T* cells, T* h_out, T* h_state, int64_t rows, int64_t H,
                           cudaStream_t stream) {
  if (!sizes_ok(rows, H)) return cudaErrorInvalidValue;
  const int64_t units = rows * H;
  if (units == 0) return cudaSuccess;
  if (gates == nullptr || c_state == nullptr || cells == nullptr || h_out == nullptr) return cudaErrorInvalidValue;
  const ForwardArgs<T> args{gates, c_state, cells, h_out, h_state, rows, H};
  lstm_forward_kernel<T><<<grid_blocks(units), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const T* gates, const T* cells, const T* c_prev, int64_t rows_with_prev, const T* c0,
                            const T* dh_a, const T* dh_b, T* dc_state, T* grad_gates, T* h_tilde, int64_t rows,
                            int64_t H, cudaStream_t stream) {
  if (!sizes_ok(rows, H) || rows_with_prev < 0 || rows_with_prev > rows) return cudaErrorInvalidValue;
  const int64_t units = rows * H;
  if (units == 0) return cudaSuccess;
  if (gates == nullptr || cells == nullptr || dh_a == nullptr || dc_state == nullptr || grad_gates == nullptr ||
      (rows_with_prev > 0 && c_prev == nullptr) || (rows_with_prev < rows && c0 == nullptr))
    return cudaErrorInvalidValue;
  const BackwardArgs<T> args{gates, cells, c_prev, rows_with_prev, c0, dh_a, dh_b, dc_state, grad_gates, h_tilde,
                             rows, H};
  lstm_backward_kernel<T><<<grid_blocks(units), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lstm_forward_step(float* gates, float* c_state, float* cells, float* h_out, float* h_state,
                              int64_t rows, int64_t H, cudaStream_t stream) {
  return launch_forward(gates, c_state, cells, h_out, h_state, rows, H, stream);
}

cudaError_t lstm_forward_step(double* gates, double* c_state, double* cells, double* h_out, double* h_state,
                              int64_t rows, int64_t H, cudaStream_t stream) {
  return launch_forward(gates, c_state, cells, h_out, h_state, rows, H, stream);
}

cudaError_t lstm_forward_step(__half* gates, __half* c_state, __half* cells, __half* h_out, __half* h_state,
                              int64_t rows, int64_t H, cudaStream_t stream) {
  return launch_forward(gates, c_state, cells, h_out, h_state, rows, H, stream);
}

cudaError_t lstm_forward_step(__nv_bfloat16* gates, __nv_bfloat16* c_state, __nv_bfloat16* cells,
                              __nv_bfloat16* h_out, __nv_bfloat16* h_state, int64_t rows, int64_t H,
                              cudaStream_t stream) {
  return launch_forward(gates, c_state, cells, h_out, h_state, rows, H, stream);
}

cudaError_t lstm_backward_step(const float* gates, const float* cells, const float* c_prev,
                               int64_t rows_with_prev, const float* c0, const float* dh_a, const float* dh_b,
                               float* dc_state, float* grad_gates, float* h_tilde, int64_t rows, int64_t H,
                               cudaStream_t stream) {
  return launch_backward(gates, cells, c_prev, rows_with_prev, c0, dh_a, dh_b, dc_state, grad_gates, h_tilde, rows,
                         H, stream);
}

cudaError_t lstm_backward_step(const double* gates, const double* cells, const double* c_prev,
                               int64_t rows_with_prev, const double* c0, const double* dh_a, const double* dh_b,
                               double* dc_state, double* grad_gates, double* h_tilde, int64_t rows, int64_t H,
                               cudaStream_t stream) {
  return launch_backward(gates, cells, c_prev, rows_with_prev, c0, dh_a, dh_b, dc_state, grad_gates, h_tilde, rows,
                         H, stream);
}

cudaError_t lstm_backward_step(const __half* gates, const __half* cells, const __half* c_prev,
                               int64_t rows_with_prev, const __half* c0, const __half* dh_a, const __half* dh_b,
                               __half* dc_state, __half* grad_gates, __half* h_tilde, int64_t rows, int64_t H,
                               cudaStream_t stream) {
  return launch_backward(gates, cells, c_prev, rows_with_prev, c0, dh_a, dh_b, dc_state, grad_gates, h_tilde, rows,
                         H, stream);
}

cudaError_t lstm_backward_step(const __nv_bfloat16* gates, const __nv_bfloat16* cells,
                               const __nv_bfloat16* c_prev, int64_t rows_with_prev, const __nv_bfloat16* c0,
                               const __nv_bfloat16* dh_a, const __nv_bfloat16* dh_b, __nv_bfloat16* dc_state,
                               __nv_bfloat16* grad_gates, __nv_bfloat16* h_tilde, int64_t rows, int64_t H,
                               cudaStream_t stream) {
  return launch_backward(gates, cells, c_prev, rows_with_prev, c0, dh_a, dh_b, dc_state, grad_gates, h_tilde, rows,
                         H, stream);
}

}  // namespace cuda_impl
}  // namespace fastnlp
