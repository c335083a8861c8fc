// CUDA kernels for the LSTM pointwise steps (semantics: lstm_step.h here and
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

#include "lstm_step.h"

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
using ForwardArgs = LstmForwardStepArgs<T>;
template <typename T>
using BackwardArgs = LstmBackwardStepArgs<T>;

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
  const acc_t c_prev = load(a.c_state + k);
  const acc_t c_new = f * c_prev + i * gg;
  const acc_t one = 1;
  acc_t c = c_new, h = o * tanh_(c_new);
  if (a.zoneout_cell != nullptr) {
    const acc_t zc = load(a.zoneout_cell + k);
    c = zc * c_prev + (one - zc) * c_new;
    if (a.zoneout_hidden != nullptr) {
      const acc_t zh = load(a.zoneout_hidden + k);
      h = zh * load(a.h_state + k) + (one - zh) * h;
    }
  }
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
  // A row whose first step this is has no saved c_{t-1}: it starts from c0.
  const acc_t c_prev = r < a.rows_with_prev ? load(a.c_prev + k) : load(a.c0 + k);
  const acc_t tc = tanh_(f * c_prev + i * gg);  // tanh(c~), recomputed rather than stored
  acc_t dh = load(a.dh_a + k);
  if (a.dh_b != nullptr) dh += load(a.dh_b + k);
  acc_t dc_carry = load(a.dc_state + k);
  acc_t dc_zone = 0;
  if (a.zoneout_cell != nullptr) {
    dc_zone = load(a.zoneout_cell + k) * dc_carry;
    dc_carry -= dc_zone;
    if (a.zoneout_hidden != nullptr) {
      const acc_t to_prev = load(a.zoneout_hidden + k) * dh;
      store(a.grad_h_prev + k, to_prev);
      dh -= to_prev;
    }
  }
  const acc_t one = 1;
  const acc_t dc = dc_carry + dh * o * (one - tc * tc);
  T* dg = a.grad_gates + r * 4 * H + j;
  store(dg, dc * gg * i * (one - i));
  store(dg + H, dc * c_prev * f * (one - f));
  store(dg + 2 * H, dc * i * (one - gg * gg));
  store(dg + 3 * H, dh * tc * o * (one - o));
  store(a.dc_state + k, dc * f + dc_zone);
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
cudaError_t launch_forward(const ForwardArgs<T>& a, cudaStream_t stream) {
  if (!sizes_ok(a.rows, a.H)) return cudaErrorInvalidValue;
  const int64_t units = a.rows * a.H;
  if (units == 0) return cudaSuccess;
  if (a.gates == nullptr || a.c_state == nullptr || a.cells == nullptr || a.h_out == nullptr ||
      (a.zoneout_hidden != nullptr && (a.zoneout_cell == nullptr || a.h_state == nullptr)))
    return cudaErrorInvalidValue;
  lstm_forward_kernel<T><<<grid_blocks(units), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const BackwardArgs<T>& a, cudaStream_t stream) {
  if (!sizes_ok(a.rows, a.H) || a.rows_with_prev < 0 || a.rows_with_prev > a.rows) return cudaErrorInvalidValue;
  const int64_t units = a.rows * a.H;
  if (units == 0) return cudaSuccess;
  if (a.gates == nullptr || a.dh_a == nullptr || a.dc_state == nullptr || a.grad_gates == nullptr ||
      (a.rows_with_prev > 0 && a.c_prev == nullptr) || (a.rows_with_prev < a.rows && a.c0 == nullptr) ||
      (a.zoneout_hidden != nullptr && (a.zoneout_cell == nullptr || a.grad_h_prev == nullptr)))
    return cudaErrorInvalidValue;
  lstm_backward_kernel<T><<<grid_blocks(units), kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t lstm_forward_step(const LstmForwardStepArgs<float>& args, cudaStream_t stream) {
  return launch_forward(args, stream);
}
cudaError_t lstm_forward_step(const LstmForwardStepArgs<double>& args, cudaStream_t stream) {
  return launch_forward(args, stream);
}
cudaError_t lstm_forward_step(const LstmForwardStepArgs<__half>& args, cudaStream_t stream) {
  return launch_forward(args, stream);
}
cudaError_t lstm_forward_step(const LstmForwardStepArgs<__nv_bfloat16>& args, cudaStream_t stream) {
  return launch_forward(args, stream);
}

cudaError_t lstm_backward_step(const LstmBackwardStepArgs<float>& args, cudaStream_t stream) {
  return launch_backward(args, stream);
}
cudaError_t lstm_backward_step(const LstmBackwardStepArgs<double>& args, cudaStream_t stream) {
  return launch_backward(args, stream);
}
cudaError_t lstm_backward_step(const LstmBackwardStepArgs<__half>& args, cudaStream_t stream) {
  return launch_backward(args, stream);
}
cudaError_t lstm_backward_step(const LstmBackwardStepArgs<__nv_bfloat16>& args, cudaStream_t stream) {
  return launch_backward(args, stream);
}

}  // namespace cuda_impl
}  // namespace fastnlp
