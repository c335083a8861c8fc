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
// python_tests/test_cuda_emulated.py runs these kernels on the CPU, through
// the emulator that csrc/cuda/launch.h makes room for.
//
// Layer-normalised steps need each row's statistics before any unit can
// finish, so they run one block per row (grid-stride over rows), threads
// striding over the row's units, with block reductions between passes. A
// thread visits the same units in every pass, so values it wrote in one
// pass (c~ parked in `cells`, the gate gradients) it reads back in the next
// without a barrier. The passes and formulas are csrc/cpu/lstm.cpp's.

#include "launch.h"
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

__host__ __device__ __forceinline__ float inv_sqrt(float x) { return 1.0f / ::sqrtf(x); }
__host__ __device__ __forceinline__ double inv_sqrt(double x) { return 1.0 / ::sqrt(x); }

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

// The sum of v over the block, returned to every thread. blockDim.x must be
// kThreads (a multiple of the warp size). The leading barrier keeps a call
// from overwriting `shared` while a previous call's threads still read it.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t v, acc_t* shared) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) shared[threadIdx.x >> 5] = v;
  __syncthreads();
  acc_t total = 0;
  for (int w = 0; w < kThreads / 32; ++w) total += shared[w];
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_forward_ln_kernel(const ForwardArgs<T> a) {
  using acc_t = compute_t<T>;
  __shared__ acc_t shared[kThreads / 32];
  const int64_t H = a.H, G = 4 * H;
  const acc_t one = 1, eps = static_cast<acc_t>(kLayerNormEps);
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    T* rec = a.norm_hh + r * G;
    T* g = a.gates + r * G;
    acc_t sum = 0;
    for (int64_t u = threadIdx.x; u < G; u += blockDim.x) sum += load(rec + u);
    const acc_t mean_hh = block_sum(sum, shared) / static_cast<acc_t>(G);
    sum = 0;
    for (int64_t u = threadIdx.x; u < G; u += blockDim.x) {
      const acc_t d = load(rec + u) - mean_hh;
      sum += d * d;
    }
    const acc_t rstd_hh = inv_sqrt(block_sum(sum, shared) / static_cast<acc_t>(G) + eps);
    acc_t sum_c = 0;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      acc_t pre[4];
      for (int q = 0; q < 4; ++q) {
        const int64_t u = q * H + j;
        const acc_t n = (load(rec + u) - mean_hh) * rstd_hh;
        store(rec + u, n);
        pre[q] = load(g + u) + (load(a.ln_hh_weight + u) * n + load(a.ln_hh_bias + u));
      }
      const acc_t i = sigmoid(pre[0]), f = sigmoid(pre[1]), gg = tanh_(pre[2]), o = sigmoid(pre[3]);
      const int64_t k = r * H + j;
      const acc_t c_prev = load(a.c_state + k);
      const acc_t c_new = f * c_prev + i * gg;
      acc_t c = c_new;
      if (a.zoneout_cell != nullptr) {
        const acc_t zc = load(a.zoneout_cell + k);
        c = zc * c_prev + (one - zc) * c_new;
      }
      store(g + j, i);
      store(g + H + j, f);
      store(g + 2 * H + j, gg);
      store(g + 3 * H + j, o);
      store(a.c_state + k, c);
      store(a.cells + k, c_new);  // parked until the last pass
      sum_c += load(a.cells + k);
    }
    const acc_t mean_c = block_sum(sum_c, shared) / static_cast<acc_t>(H);
    sum = 0;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const acc_t d = load(a.cells + r * H + j) - mean_c;
      sum += d * d;
    }
    const acc_t rstd_c = inv_sqrt(block_sum(sum, shared) / static_cast<acc_t>(H) + eps);
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const int64_t k = r * H + j;
      const acc_t y = load(a.ln_cell_weight + j) * ((load(a.cells + k) - mean_c) * rstd_c) + load(a.ln_cell_bias + j);
      acc_t h = load(g + 3 * H + j) * tanh_(y);
      if (a.zoneout_hidden != nullptr) {
        const acc_t zh = load(a.zoneout_hidden + k);
        h = zh * load(a.h_state + k) + (one - zh) * h;
      }
      store(a.h_out + k, h);
      if (a.h_state != nullptr) store(a.h_state + k, h);
      store(a.cells + k, load(a.c_state + k));
    }
    if (threadIdx.x == 0) {
      a.ln_stats[r * 4 + 1] = rstd_hh;
      a.ln_stats[r * 4 + 2] = mean_c;
      a.ln_stats[r * 4 + 3] = rstd_c;
    }
  }
}

// dL/dh~ of unit (r, j) with zoneout's share taken out; that share is
// written to grad_h_prev when `write_share`.
template <typename T>
__device__ __forceinline__ compute_t<T> grad_h_tilde(const BackwardArgs<T>& a, int64_t k, bool write_share) {
  compute_t<T> dh = load(a.dh_a + k);
  if (a.dh_b != nullptr) dh += load(a.dh_b + k);
  if (a.zoneout_hidden != nullptr) {
    const compute_t<T> to_prev = load(a.zoneout_hidden + k) * dh;
    if (write_share) store(a.grad_h_prev + k, to_prev);
    dh -= to_prev;
  }
  return dh;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_backward_ln_kernel(const BackwardArgs<T> a) {
  using acc_t = compute_t<T>;
  __shared__ acc_t shared[kThreads / 32];
  const int64_t H = a.H, G = 4 * H;
  const acc_t one = 1;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    const T* g = a.gates + r * G;
    const T* rec = a.norm_hh + r * G;
    T* dg = a.grad_gates + r * G;
    const T* c_prev_row = r < a.rows_with_prev ? a.c_prev + r * H : a.c0 + r * H;
    const acc_t rstd_hh = a.ln_stats[r * 4 + 1], mean_c = a.ln_stats[r * 4 + 2], rstd_c = a.ln_stats[r * 4 + 3];
    // Pass 1: the cell LN's output gradient and the sums its backward needs.
    acc_t sum_d = 0, sum_dn = 0;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const int64_t k = r * H + j;
      const acc_t i = load(g + j), f = load(g + H + j), gg = load(g + 2 * H + j), o = load(g + 3 * H + j);
      const acc_t n = ((f * load(c_prev_row + j) + i * gg) - mean_c) * rstd_c;
      const acc_t tc = tanh_(load(a.ln_cell_weight + j) * n + load(a.ln_cell_bias + j));
      const acc_t dy = grad_h_tilde(a, k, true) * o * (one - tc * tc);
      store(a.grad_ln_cell + r * 2 * H + j, dy * n);
      store(a.grad_ln_cell + r * 2 * H + H + j, dy);
      const acc_t d = dy * load(a.ln_cell_weight + j);
      sum_d += d;
      sum_dn += d * n;
    }
    const acc_t mean_d = block_sum(sum_d, shared) / static_cast<acc_t>(H);
    const acc_t mean_dn = block_sum(sum_dn, shared) / static_cast<acc_t>(H);
    // Pass 2: the gate gradients (recomputing pass 1's per-unit values).
    acc_t sum_g = 0, sum_gn = 0;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const int64_t k = r * H + j;
      const acc_t i = load(g + j), f = load(g + H + j), gg = load(g + 2 * H + j), o = load(g + 3 * H + j);
      const acc_t cp = load(c_prev_row + j);
      const acc_t n = ((f * cp + i * gg) - mean_c) * rstd_c;
      const acc_t tc = tanh_(load(a.ln_cell_weight + j) * n + load(a.ln_cell_bias + j));
      const acc_t dh = grad_h_tilde(a, k, false);
      const acc_t d = dh * o * (one - tc * tc) * load(a.ln_cell_weight + j);
      acc_t dc_carry = load(a.dc_state + k);
      acc_t dc_zone = 0;
      if (a.zoneout_cell != nullptr) {
        dc_zone = load(a.zoneout_cell + k) * dc_carry;
        dc_carry -= dc_zone;
      }
      const acc_t dc = dc_carry + rstd_c * (d - mean_d - n * mean_dn);
      store(dg + j, dc * gg * i * (one - i));
      store(dg + H + j, dc * cp * f * (one - f));
      store(dg + 2 * H + j, dc * i * (one - gg * gg));
      store(dg + 3 * H + j, dh * tc * o * (one - o));
      store(a.dc_state + k, dc * f + dc_zone);
      if (a.h_tilde != nullptr) store(a.h_tilde + k, o * tc);
      for (int q = 0; q < 4; ++q) {
        const int64_t u = q * H + j;
        const acc_t dq = load(dg + u) * load(a.ln_hh_weight + u);
        sum_g += dq;
        sum_gn += dq * load(rec + u);
      }
    }
    const acc_t mean_g = block_sum(sum_g, shared) / static_cast<acc_t>(G);
    const acc_t mean_gn = block_sum(sum_gn, shared) / static_cast<acc_t>(G);
    // Pass 3: through LN_hh to the recurrent product.
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      for (int q = 0; q < 4; ++q) {
        const int64_t u = q * H + j;
        const acc_t dq = load(dg + u) * load(a.ln_hh_weight + u);
        store(a.grad_rec + r * G + u, rstd_hh * (dq - mean_g - load(rec + u) * mean_gn));
      }
    }
  }
}

// lstm_sequence_forward: block b carries sequences b * S .. b * S + S - 1
// (S = kSequencesPerBlock, fewer in the last block) through every step. Per
// step: (1) their h_{t-1} (masked) into shared memory, widened; (2) one warp
// per gate row k: lanes split the row of W_hh, each multiplies its stretch by
// the S states, and a shuffle reduction adds gates[r, k] += h_r . W_hh[k, :];
// (3) forward_unit on the block's units, exactly the step kernel's work.
// Barriers between the phases; the block only ever touches its own sequences'
// rows, so no other block needs to wait. A sequence not alive at a step
// (past its length; in reverse, before its last step) keeps its state, as in
// the step loop.
constexpr int64_t kSequencesPerBlock = 4;
// Static shared memory limit without an opt-in.
constexpr size_t kSequenceSharedBytes = 48 * 1024;

template <typename T>
using SequenceForwardArgs = LstmSequenceForwardArgs<T>;

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_sequence_forward_kernel(const SequenceForwardArgs<T> a) {
  using acc_t = compute_t<T>;
  acc_t* h = reinterpret_cast<acc_t*>(dynamic_shared_memory());  // (S, H)
  const int64_t H = a.H, G = 4 * H;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kSequencesPerBlock;
  const int64_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int64_t s = 0; s < a.steps; ++s) {
    const int64_t t = a.reverse ? a.steps - 1 - s : s;
    const int64_t offset = a.offsets[t] + first;  // this block's first row at step t
    const int64_t alive_after_first = a.offsets[t + 1] - offset;
    const int64_t rows = alive_after_first < kSequencesPerBlock ? alive_after_first : kSequencesPerBlock;
    if (rows <= 0) continue;  // the same for every thread of the block
    for (int64_t u = threadIdx.x; u < rows * H; u += blockDim.x) {
      acc_t v = load(a.h_state + first * H + u);
      if (a.recurrent_mask != nullptr) v *= load(a.recurrent_mask + first * H + u);
      h[u] = v;
    }
    __syncthreads();
    for (int64_t k = warp; k < G; k += warps) {
      const T* w = a.weight_hh + k * H;
      // Loops over r have a constant trip count, which nvcc unrolls, so
      // sum[] lives in registers; the guard is the same for the whole warp.
      acc_t sum[kSequencesPerBlock] = {};
      for (int64_t j = lane; j < H; j += 32) {
        const acc_t wj = load(w + j);
        for (int64_t r = 0; r < kSequencesPerBlock; ++r)
          if (r < rows) sum[r] += wj * h[r * H + j];
      }
      for (int64_t r = 0; r < kSequencesPerBlock; ++r) {
        if (r < rows) {
          acc_t v = sum[r];
          for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
          if (lane == 0) {
            T* g = a.gates + (offset + r) * G + k;
            store(g, load(g) + v);
          }
        }
      }
    }
    __syncthreads();
    const ForwardArgs<T> step{a.gates + offset * G,
                              a.c_state + first * H,
                              a.cells + offset * H,
                              a.output + offset * H,
                              a.h_state + first * H,
                              a.zoneout_cell != nullptr ? a.zoneout_cell + offset * H : nullptr,
                              a.zoneout_hidden != nullptr ? a.zoneout_hidden + offset * H : nullptr,
                              rows,
                              H};
    for (int64_t u = threadIdx.x; u < rows * H; u += blockDim.x) forward_unit(step, u / H, u % H);
    __syncthreads();  // before the next step reads h_state
  }
}

// lstm_sequence_backward: the same blocks of sequences, the steps in
// backward order. Per step: (1) backward_unit on the block's units, exactly
// the step kernel's work (and h_prev for the weight gradient); (2) the
// block's gate gradients into shared memory, widened; (3) one thread per unit
// j: dL/dh_{t-1}[r, j] = sum_k grad_gates[r, k] W_hh[k, j] over the 4H rows
// of W_hh, neighbouring threads reading neighbouring j (coalesced), then the
// mask and zoneout's share. Barriers between the phases.
template <typename T>
using SequenceBackwardArgs = LstmSequenceBackwardArgs<T>;

template <typename T>
__global__ void __launch_bounds__(kThreads) lstm_sequence_backward_kernel(const SequenceBackwardArgs<T> a) {
  using acc_t = compute_t<T>;
  acc_t* grad = reinterpret_cast<acc_t*>(dynamic_shared_memory());  // (S, 4H)
  const int64_t H = a.H, G = 4 * H;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * kSequencesPerBlock;
  for (int64_t s = 0; s < a.steps; ++s) {
    const int64_t t = a.reverse ? s : a.steps - 1 - s;
    const int64_t offset = a.offsets[t] + first;
    const int64_t alive_after_first = a.offsets[t + 1] - offset;
    const int64_t rows = alive_after_first < kSequencesPerBlock ? alive_after_first : kSequencesPerBlock;
    if (rows <= 0) continue;  // the same for every thread of the block
    // The step the forward pass took just before t: its rows give c_{t-1}
    // and h_{t-1}; rows it did not have start from c0 and h0.
    const int64_t prev = a.reverse ? t + 1 : t - 1;
    int64_t with_prev = 0, prev_offset = 0;
    if (prev >= 0 && prev < a.steps) {
      prev_offset = a.offsets[prev] + first;
      const int64_t alive_before = a.offsets[prev + 1] - prev_offset;
      with_prev = alive_before < 0 ? 0 : alive_before < rows ? alive_before : rows;
    }
    const T* zoneout_hidden = a.zoneout_hidden != nullptr ? a.zoneout_hidden + offset * H : nullptr;
    const BackwardArgs<T> step{a.gates + offset * G,
                               with_prev > 0 ? a.cells + prev_offset * H : nullptr,
                               with_prev,
                               a.c0 + first * H,
                               a.grad_output + offset * H,
                               a.dh_state + first * H,
                               a.dc_state + first * H,
                               a.grad_gates + offset * G,
                               nullptr,
                               a.zoneout_cell != nullptr ? a.zoneout_cell + offset * H : nullptr,
                               zoneout_hidden,
                               zoneout_hidden != nullptr ? a.grad_h_zoneout + first * H : nullptr,
                               rows,
                               H};
    for (int64_t u = threadIdx.x; u < rows * H; u += blockDim.x) {
      const int64_t r = u / H, j = u % H;
      backward_unit(step, r, j);
      if (a.h_prev != nullptr) {
        acc_t h = r < with_prev ? load(a.output + (prev_offset + r) * H + j) : load(a.h0 + first * H + u);
        if (a.recurrent_mask != nullptr) h *= load(a.recurrent_mask + first * H + u);
        store(a.h_prev + offset * H + u, h);
      }
    }
    __syncthreads();
    for (int64_t u = threadIdx.x; u < rows * G; u += blockDim.x) grad[u] = load(a.grad_gates + offset * G + u);
    __syncthreads();
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      acc_t sum[kSequencesPerBlock] = {};  // constant trip counts, unrolled: registers
      for (int64_t k = 0; k < G; ++k) {
        const acc_t w = load(a.weight_hh + k * H + j);
        for (int64_t r = 0; r < kSequencesPerBlock; ++r)
          if (r < rows) sum[r] += grad[r * G + k] * w;
      }
      for (int64_t r = 0; r < kSequencesPerBlock; ++r) {
        if (r < rows) {
          const int64_t at = (first + r) * H + j;
          acc_t dh = sum[r];
          if (a.recurrent_mask != nullptr) dh *= load(a.recurrent_mask + at);
          if (zoneout_hidden != nullptr) dh += load(a.grad_h_zoneout + at);
          store(a.dh_state + at, dh);
        }
      }
    }
    __syncthreads();  // before the next step reads dh_state and overwrites grad
  }
}

bool sizes_ok(int64_t rows, int64_t H) { return rows >= 0 && H >= 0 && (H == 0 || rows <= kMaxUnits / H); }

unsigned row_blocks(int64_t rows) { return static_cast<unsigned>(rows < kMaxBlocks ? rows : kMaxBlocks); }

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
  if (a.norm_hh != nullptr) {
    if (a.ln_hh_weight == nullptr || a.ln_hh_bias == nullptr || a.ln_cell_weight == nullptr ||
        a.ln_cell_bias == nullptr || a.ln_stats == nullptr)
      return cudaErrorInvalidValue;
    launch_kernel(lstm_forward_ln_kernel<T>, row_blocks(a.rows), kThreads, 0, stream, a);
    return cudaGetLastError();
  }
  launch_kernel(lstm_forward_kernel<T>, grid_blocks(units), kThreads, 0, stream, a);
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
  if (a.norm_hh != nullptr) {
    if (a.ln_stats == nullptr || a.ln_hh_weight == nullptr || a.ln_cell_weight == nullptr ||
        a.ln_cell_bias == nullptr || a.grad_rec == nullptr || a.grad_ln_cell == nullptr)
      return cudaErrorInvalidValue;
    launch_kernel(lstm_backward_ln_kernel<T>, row_blocks(a.rows), kThreads, 0, stream, a);
    return cudaGetLastError();
  }
  launch_kernel(lstm_backward_kernel<T>, grid_blocks(units), kThreads, 0, stream, a);
  return cudaGetLastError();
}

// Shared memory of one block: the forward's S states of H, or the
// backward's S gate gradients of 4H.
size_t sequence_shared_bytes(int64_t values_per_sequence, size_t compute_bytes) {
  return static_cast<size_t>(kSequencesPerBlock) * static_cast<size_t>(values_per_sequence) * compute_bytes;
}

// The sizes and the work both sequence kernels share: cudaSuccess with
// *blocks set, cudaErrorInvalidValue, or cudaSuccess with *blocks = 0 for
// nothing to do.
cudaError_t sequence_grid(int64_t steps, int64_t batch, int64_t H, size_t compute_bytes, unsigned* blocks) {
  *blocks = 0;
  if (steps < 0 || batch < 0 || H < 0 || !lstm_sequence_kernels_fit(H, compute_bytes) || !sizes_ok(batch, 4 * H))
    return cudaErrorInvalidValue;
  if (steps == 0 || batch == 0 || H == 0) return cudaSuccess;
  const int64_t count = (batch + kSequencesPerBlock - 1) / kSequencesPerBlock;
  if (count > kMaxBlocks) return cudaErrorInvalidValue;
  *blocks = static_cast<unsigned>(count);
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_sequence_forward(const SequenceForwardArgs<T>& a, cudaStream_t stream) {
  unsigned blocks = 0;
  const cudaError_t sizes = sequence_grid(a.steps, a.batch, a.H, sizeof(compute_t<T>), &blocks);
  if (sizes != cudaSuccess || blocks == 0) return sizes;
  if (a.offsets == nullptr || a.gates == nullptr || a.c_state == nullptr || a.h_state == nullptr ||
      a.cells == nullptr || a.output == nullptr || a.weight_hh == nullptr ||
      (a.zoneout_hidden != nullptr && a.zoneout_cell == nullptr))
    return cudaErrorInvalidValue;
  launch_kernel(lstm_sequence_forward_kernel<T>, blocks, kThreads, sequence_shared_bytes(a.H, sizeof(compute_t<T>)),
                stream, a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sequence_backward(const SequenceBackwardArgs<T>& a, cudaStream_t stream) {
  unsigned blocks = 0;
  const cudaError_t sizes = sequence_grid(a.steps, a.batch, a.H, sizeof(compute_t<T>), &blocks);
  if (sizes != cudaSuccess || blocks == 0) return sizes;
  if (a.offsets == nullptr || a.gates == nullptr || a.cells == nullptr || a.output == nullptr ||
      a.h0 == nullptr || a.c0 == nullptr || a.grad_output == nullptr || a.dh_state == nullptr ||
      a.dc_state == nullptr || a.grad_gates == nullptr || a.weight_hh == nullptr ||
      (a.zoneout_hidden != nullptr && (a.zoneout_cell == nullptr || a.grad_h_zoneout == nullptr)))
    return cudaErrorInvalidValue;
  launch_kernel(lstm_sequence_backward_kernel<T>, blocks, kThreads,
                sequence_shared_bytes(4 * a.H, sizeof(compute_t<T>)), stream, a);
  return cudaGetLastError();
}

}  // namespace

bool lstm_sequence_kernels_fit(int64_t H, size_t compute_bytes) {
  return H >= 0 && H <= (1 << 20) && sequence_shared_bytes(4 * H, compute_bytes) <= kSequenceSharedBytes;
}

cudaError_t lstm_sequence_forward(const LstmSequenceForwardArgs<float>& args, cudaStream_t stream) {
  return launch_sequence_forward(args, stream);
}
cudaError_t lstm_sequence_forward(const LstmSequenceForwardArgs<double>& args, cudaStream_t stream) {
  return launch_sequence_forward(args, stream);
}
cudaError_t lstm_sequence_forward(const LstmSequenceForwardArgs<__half>& args, cudaStream_t stream) {
  return launch_sequence_forward(args, stream);
}
cudaError_t lstm_sequence_forward(const LstmSequenceForwardArgs<__nv_bfloat16>& args, cudaStream_t stream) {
  return launch_sequence_forward(args, stream);
}

cudaError_t lstm_sequence_backward(const LstmSequenceBackwardArgs<float>& args, cudaStream_t stream) {
  return launch_sequence_backward(args, stream);
}
cudaError_t lstm_sequence_backward(const LstmSequenceBackwardArgs<double>& args, cudaStream_t stream) {
  return launch_sequence_backward(args, stream);
}
cudaError_t lstm_sequence_backward(const LstmSequenceBackwardArgs<__half>& args, cudaStream_t stream) {
  return launch_sequence_backward(args, stream);
}
cudaError_t lstm_sequence_backward(const LstmSequenceBackwardArgs<__nv_bfloat16>& args, cudaStream_t stream) {
  return launch_sequence_backward(args, stream);
}

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
