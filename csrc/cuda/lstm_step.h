// Host launchers for the LSTM pointwise step kernels.
//
// Torch-free on purpose: raw device pointers, sizes and a stream in, a
// cudaError_t out (the error of the launch itself; kernels run asynchronously
// on `stream`). csrc/cuda/lstm_binding.cpp plugs them into the device-generic
// time loop of csrc/lstm.cpp as its LstmStepKernels, whose comments in
// csrc/lstm.h are the contract; the GEMMs between the steps are cuBLAS calls
// made there, not here.
//
// Layouts, all row-major and contiguous, one row per sequence alive at the
// step (`rows` of them), H = hidden size:
//   gates (rows, 4H): the four gate blocks i, f, g, o side by side, so unit j
//     of row r has its gates at r * 4H + {0, H, 2H, 3H} + j;
//   every other tensor (rows, H): unit j of row r at r * H + j.
// Every floating pointer of one call has the same type. float and double are
// computed in their own type; __half and __nv_bfloat16 are stored in that
// type and computed in float (each value is widened on load and rounded once
// on store).
//
// Buffers must not overlap, except where a pointer is documented as read and
// then overwritten in place.
//
// Sizes: rows, H >= 0; rows * H <= 2^60. rows == 0 or H == 0 returns
// cudaSuccess without launching. Invalid sizes, or a null pointer that the
// sizes require, return cudaErrorInvalidValue.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace fastnlp {
namespace cuda_impl {

// The arithmetic type of the step kernels: double for double, float for
// everything else. The layer-norm statistics are kept in it too (half types
// would lose too much of rstd).
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
template <typename T>
using ln_stat_t = compute_t<T>;

// Layer normalisation (csrc/lstm.h, LstmLayerNorm): when norm_hh is given,
// the step normalises the recurrent product (over its 4H values per row)
// and the new cell c~ (over H) and adds/uses them as
//   pre = gates + ln_hh_weight * norm(rec) + ln_hh_bias,
//   h~ = o * tanh(ln_cell_weight * norm(c~) + ln_cell_bias),
// norm(v) = (v - mean) * rstd, rstd = 1 / sqrt(biased var + kLayerNormEps).
// Those steps run one block of threads per row (block reductions) instead
// of one thread per unit; the arithmetic per unit is the same. c~ waits for
// its row's statistics in `cells`, so for __half/__nv_bfloat16 it is rounded
// to the storage type before it is normalised.
constexpr double kLayerNormEps = 1e-5;

// One forward step. With c~ = f * c_{t-1} + i * g and zoneout weights z
// (absent: z = 0):
//   gates (rows, 4H): pre-activations in; sigmoid(i), sigmoid(f), tanh(g),
//     sigmoid(o) out, in place;
//   c_state (rows, H): c_{t-1} in, c_t = zc * c_{t-1} + (1 - zc) * c~ out;
//   cells (rows, H): c_t out;
//   h_out (rows, H): h_t = zh * h_{t-1} + (1 - zh) * o * tanh(c~) out;
//   h_state (rows, H) or nullptr: h_{t-1} in (read only when zoneout_hidden
//     is given), h_t out (the recurrent state when no projection follows);
//   zoneout_cell (rows, H) or nullptr: zc;
//   zoneout_hidden (rows, H) or nullptr: zh; needs zoneout_cell and h_state.
// Layer normalisation (all nullptr without it, all given with it); then
// gates holds the normalised input half plus biases, and:
//   norm_hh (rows, 4H): h_{t-1} W_hh^T in, normalised out, in place;
//   ln_hh_weight, ln_hh_bias (4H); ln_cell_weight, ln_cell_bias (H);
//   ln_stats (rows, 4), row stride 4: columns 1..3 (rstd_hh, mean of c~,
//     rstd of c~) out; column 0 is left alone.
// c_t (zoneout mixes c~, not its normalisation) is what c_state and cells get.
template <typename T>
struct LstmForwardStepArgs {
  T* gates;
  T* c_state;
  T* cells;
  T* h_out;
  T* h_state;
  const T* zoneout_cell;
  const T* zoneout_hidden;
  int64_t rows;
  int64_t H;
  T* norm_hh = nullptr;
  const T* ln_hh_weight = nullptr;
  const T* ln_hh_bias = nullptr;
  const T* ln_cell_weight = nullptr;
  const T* ln_cell_bias = nullptr;
  ln_stat_t<T>* ln_stats = nullptr;
};

// One backward step, from what the forward step saved:
//   gates (rows, 4H): the activations i, f, g, o (forward's output gates);
//   c_prev (rows_with_prev, H): c_{t-1} of rows 0..rows_with_prev-1; nullptr
//     allowed when rows_with_prev == 0;
//   c0 (>= rows, H): c_{t-1} of rows rows_with_prev..rows-1 (those whose first
//     step this is), read at the same row index; nullptr allowed when
//     rows_with_prev == rows;
//   dh_a (rows, H), dh_b (rows, H) or nullptr: dL/dh_t = dh_a + dh_b;
//   dc_state (rows, H): dL/dc_t in, dL/dc_{t-1} out, in place;
//   grad_gates (rows, 4H): dL/d(pre-activations) out, same layout as gates;
//   h_tilde (rows, H) or nullptr: o * tanh(c~) out (the input of a
//     projection, which the caller needs for its weight gradient);
//   zoneout_cell, zoneout_hidden: as in the forward step;
//   grad_h_prev (rows, H): zh * dL/dh_t out, the part of dL/dh_{t-1} that
//     zoneout carries past the cell; needed with zoneout_hidden.
// c~ is recomputed from the gates and c_{t-1}. Needs 0 <= rows_with_prev <= rows.
// Layer normalisation (all nullptr without it, all given with it):
//   norm_hh (rows, 4H), ln_stats (rows, 4): what the forward step left;
//   ln_hh_weight (4H), ln_cell_weight, ln_cell_bias (H);
//   grad_rec (rows, 4H) out: dL/d(h_{t-1} W_hh^T), through LN_hh;
//   grad_ln_cell (rows, 2H) out: [dL/dy * norm(c~), dL/dy] per row, y the
//     cell LN's output (summed over rows by the caller for its gain and bias).
template <typename T>
struct LstmBackwardStepArgs {
  const T* gates;
  const T* c_prev;
  int64_t rows_with_prev;
  const T* c0;
  const T* dh_a;
  const T* dh_b;
  T* dc_state;
  T* grad_gates;
  T* h_tilde;
  const T* zoneout_cell;
  const T* zoneout_hidden;
  T* grad_h_prev;
  int64_t rows;
  int64_t H;
  const T* norm_hh = nullptr;
  const ln_stat_t<T>* ln_stats = nullptr;
  const T* ln_hh_weight = nullptr;
  const T* ln_cell_weight = nullptr;
  const T* ln_cell_bias = nullptr;
  T* grad_rec = nullptr;
  T* grad_ln_cell = nullptr;
};

// The whole forward time loop of one direction in one launch, for a layer
// without projection or layer normalisation: at every step (t = 0 .. steps-1,
// or steps-1 .. 0 when reverse) gates += h_{t-1} W_hh^T, then the forward
// step above, over the rows alive at that step. The same results as the time
// loop of csrc/lstm.cpp with lstm_forward_step (up to the order of the
// product's sums), without a launch, a GEMM call and their host work per
// step: one block of threads carries a few sequences through every step,
// reading W_hh from the L2 cache each time. That pays where the step loop is
// bound by its launches (small batches and hidden sizes); past
// lstm_sequence_kernels_fit it cannot run.
//   offsets (steps + 1), device memory: the rows of step t are
//     offsets[t] .. offsets[t+1]-1 of the (N, .) tensors, sequence r of
//     them at offsets[t] + r; non-decreasing, offsets[0] = 0, each step at
//     most `batch` rows, one step's rows a prefix of the previous step's
//     (packed layout, csrc/lstm.h);
//   gates (N, 4H): x_t W_ih^T + biases in, the activations out;
//   c_state, h_state (batch, H): c0 / h0 in, c_n / h_n out;
//   cells, output (N, H): c_t and h_t of every row out;
//   weight_hh (4H, H);
//   recurrent_mask (batch, H) or nullptr: h_{t-1} enters the product as
//     h_{t-1} * recurrent_mask (the state itself is not masked);
//   zoneout_cell, zoneout_hidden (N, H) or nullptr: as in the step.
template <typename T>
struct LstmSequenceForwardArgs {
  const int64_t* offsets;
  int64_t steps;
  int64_t batch;
  int64_t H;
  bool reverse;
  T* gates;
  T* c_state;
  T* h_state;
  T* cells;
  T* output;
  const T* weight_hh;
  const T* recurrent_mask;
  const T* zoneout_cell;
  const T* zoneout_hidden;
};

// The backward time loop to lstm_sequence_forward, for the same layers, in
// one launch: at every step in backward order, the backward step above on
// the rows alive there, then dL/dh_{t-1} = (grad_gates W_hh) * recurrent_mask
// (+ zoneout's share). The same as csrc/lstm.cpp's time loop with
// lstm_backward_step and a cuBLAS product, up to the order of the product's
// sums. offsets, steps, batch, H, reverse, weight_hh and the regularisers as
// in LstmSequenceForwardArgs (reverse: the direction of the forward pass);
// from the forward pass: gates (N, 4H) its activations, cells and output
// (N, H), h0 and c0 (batch, H); and:
//   grad_output (N, H): dL/dh_t of every row from above;
//   dh_state, dc_state (batch, H): dL/dh_n, dL/dc_n in, dL/dh0, dL/dc0 out;
//   grad_gates (N, 4H) out: dL/d(pre-activations) of every row;
//   h_prev (N, H) out, or nullptr: h_{t-1} * recurrent_mask of every row,
//     the recurrent product's input (for the weight gradient);
//   grad_h_zoneout (batch, H): scratch, needed with zoneout_hidden.
template <typename T>
struct LstmSequenceBackwardArgs {
  const int64_t* offsets;
  int64_t steps;
  int64_t batch;
  int64_t H;
  bool reverse;
  const T* gates;
  const T* cells;
  const T* output;
  const T* h0;
  const T* c0;
  const T* grad_output;
  T* dh_state;
  T* dc_state;
  T* grad_gates;
  T* h_prev;
  const T* weight_hh;
  const T* recurrent_mask;
  const T* zoneout_cell;
  const T* zoneout_hidden;
  T* grad_h_zoneout;
};

// Whether lstm_sequence_forward and lstm_sequence_backward can run with
// hidden size H (the backward's shared memory holds a few sequences' gate
// gradients, 4H each, widened to compute_t<T>, of compute_bytes each).
bool lstm_sequence_kernels_fit(int64_t H, size_t compute_bytes);

cudaError_t lstm_sequence_forward(const LstmSequenceForwardArgs<float>& args, cudaStream_t stream);
cudaError_t lstm_sequence_forward(const LstmSequenceForwardArgs<double>& args, cudaStream_t stream);
cudaError_t lstm_sequence_forward(const LstmSequenceForwardArgs<__half>& args, cudaStream_t stream);
cudaError_t lstm_sequence_forward(const LstmSequenceForwardArgs<__nv_bfloat16>& args, cudaStream_t stream);

cudaError_t lstm_sequence_backward(const LstmSequenceBackwardArgs<float>& args, cudaStream_t stream);
cudaError_t lstm_sequence_backward(const LstmSequenceBackwardArgs<double>& args, cudaStream_t stream);
cudaError_t lstm_sequence_backward(const LstmSequenceBackwardArgs<__half>& args, cudaStream_t stream);
cudaError_t lstm_sequence_backward(const LstmSequenceBackwardArgs<__nv_bfloat16>& args, cudaStream_t stream);

cudaError_t lstm_forward_step(const LstmForwardStepArgs<float>& args, cudaStream_t stream);
cudaError_t lstm_forward_step(const LstmForwardStepArgs<double>& args, cudaStream_t stream);
cudaError_t lstm_forward_step(const LstmForwardStepArgs<__half>& args, cudaStream_t stream);
cudaError_t lstm_forward_step(const LstmForwardStepArgs<__nv_bfloat16>& args, cudaStream_t stream);

cudaError_t lstm_backward_step(const LstmBackwardStepArgs<float>& args, cudaStream_t stream);
cudaError_t lstm_backward_step(const LstmBackwardStepArgs<double>& args, cudaStream_t stream);
cudaError_t lstm_backward_step(const LstmBackwardStepArgs<__half>& args, cudaStream_t stream);
cudaError_t lstm_backward_step(const LstmBackwardStepArgs<__nv_bfloat16>& args, cudaStream_t stream);

}  // namespace cuda_impl
}  // namespace fastnlp
