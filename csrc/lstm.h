// One LSTM layer in one direction, over a time-major packed batch, written
// once for every device: the GEMMs are ATen calls (MKL/oneDNN on the CPU,
// cuBLAS on CUDA) and the per-step pointwise work is a device kernel passed
// in as a StepKernels table (csrc/cpu/lstm.cpp, csrc/cuda/lstm_binding.cpp).
//
// Layout, as in torch.nn.utils.rnn.PackedSequence: `input` (N, I) holds the
// rows of time step 0 for the batch_sizes[0] sequences alive at t = 0, then
// those of step 1, and so on; batch_sizes (T,) is non-increasing, so the
// sequences alive at step t are rows 0..batch_sizes[t]-1 of the batch and each
// sequence stops at its own length. An empty batch_sizes means padded input:
// every one of the B = h0.size(0) sequences has N / B steps.
//
// Shapes: H = hidden size, P = projection size (H when there is no
// projection), G = 4H gate pre-activations in the order i, f, g, o.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <functional>
#include <optional>
#include <tuple>
#include <vector>

namespace fastnlp {

// The tensors of one step, each a view of its first `rows` rows (the
// sequences alive at that step); undefined tensors are absent options.
struct LstmForwardStep {
  at::Tensor gates;           // (rows, 4H): pre-activations in, activations (sigmoid/tanh) out
  at::Tensor c_state;         // (rows, H): c_{t-1} in, c_t out
  at::Tensor cells;           // (rows, H): c_t out (saved for the backward pass)
  at::Tensor h_out;           // (rows, H): h_t out; o * tanh(c~_t) when a projection follows
  at::Tensor h_state;         // (rows, H): h_{t-1} in, h_t out; undefined when a projection follows
  at::Tensor zoneout_cell;    // (rows, H) z: c_t = z * c_{t-1} + (1 - z) * c~_t; or undefined
  at::Tensor zoneout_hidden;  // (rows, H) the same for h; undefined when a projection follows
  // Layer normalisation; all undefined without it. Then gates holds LN_ih(x W_ih^T) + biases
  // and the recurrent product arrives separately in norm_hh:
  at::Tensor norm_hh;         // (rows, 4H): h_{t-1} W_hh^T in, normalised (x - mean) * rstd out
  at::Tensor ln_hh_weight, ln_hh_bias;      // (4H): gates += ln_hh_weight * norm_hh + ln_hh_bias
  at::Tensor ln_cell_weight, ln_cell_bias;  // (H): h~_t = o * tanh(ln_cell_weight * norm(c~_t) + ln_cell_bias)
  at::Tensor ln_stats;        // (rows, 4) float/double: columns 1..3 (rstd_hh, mean_cell, rstd_cell) out
};

struct LstmBackwardStep {
  at::Tensor gates;           // (rows, 4H): the activations forward saved
  at::Tensor c_prev;          // (rows_with_prev, H): c_{t-1} of the rows that have a previous step
  int64_t rows_with_prev;     // the other rows start here: their c_{t-1} is row r of c0
  at::Tensor c0;              // (B, H)
  at::Tensor dh_a, dh_b;      // (rows, H): dL/dh_t = dh_a + dh_b (dh_b may be undefined)
  at::Tensor dc_state;        // (rows, H): dL/dc_t in, dL/dc_{t-1} out
  at::Tensor grad_gates;      // (rows, 4H) out: dL/d(pre-activations)
  at::Tensor h_tilde;         // (rows, H) out, if defined: o * tanh(c~_t), the projection's input
  at::Tensor zoneout_cell;    // as in LstmForwardStep
  at::Tensor zoneout_hidden;  // as in LstmForwardStep; then:
  at::Tensor grad_h_prev;     // (rows, H) out: z * dL/dh_t, the part of dL/dh_{t-1} zoneout carries
  // Layer normalisation (as in LstmForwardStep; all undefined without it):
  at::Tensor norm_hh;         // (rows, 4H): what forward left there
  at::Tensor ln_stats;        // (rows, 4): what forward wrote
  at::Tensor ln_hh_weight, ln_cell_weight, ln_cell_bias;
  at::Tensor grad_rec;        // (rows, 4H) out: dL/d(h_{t-1} W_hh^T), through LN_hh
  at::Tensor grad_ln_cell;    // (rows, 2H) out: per row [dL/dy * norm(c~), dL/dy], y = LN_cell(c~)
};

// The whole forward time loop of one direction at once
// (LstmStepKernels::sequence_forward). steps and offsets: the rows of each
// step and where they start (see lstm_forward_impl); the tensors as there:
// gates (N, 4H) with the input half and biases in, c_state and h_state
// (B, H) holding c0 and h0, cells and output (N, H), weight_hh (4H, H), and
// the regularisers (undefined when absent), all contiguous.
struct LstmSequenceForward {
  const std::vector<int64_t>& steps;
  const std::vector<int64_t>& offsets;
  bool reverse;
  at::Tensor gates, c_state, h_state, cells, output, weight_hh;
  at::Tensor recurrent_mask, zoneout_cell, zoneout_hidden;
};

// The whole backward time loop of one direction at once
// (LstmStepKernels::sequence_backward), for the directions sequence_forward
// takes: steps, offsets and reverse as there; from the forward pass gates,
// cells, output (N, .), h0 and c0 (B, H); grad_output (N, H); dh_state and
// dc_state (B, H): dL/dh_n and dL/dc_n in, dL/dh0 and dL/dc0 out;
// grad_gates (N, 4H) out; h_prev (N, H) out, or undefined: every row's
// h_{t-1} as the recurrent product saw it (masked); grad_h_zoneout (B, H):
// scratch when zoneout_hidden is given; weight_hh and the regularisers as in
// LstmSequenceForward. All contiguous.
struct LstmSequenceBackward {
  const std::vector<int64_t>& steps;
  const std::vector<int64_t>& offsets;
  bool reverse;
  at::Tensor gates, cells, output, h0, c0, grad_output, dh_state, dc_state, grad_gates, h_prev, weight_hh;
  at::Tensor recurrent_mask, zoneout_cell, zoneout_hidden, grad_h_zoneout;
};

// The step of a direction's forward pass processed just before step t (of
// T), or -1 for a sequence's first step: the step whose cells and outputs
// rows of step t continue (packed input: the first min(rows of t, rows of
// that step) of them; the rest start from c0 and h0).
inline int64_t previous_step(int64_t t, int64_t T, bool reverse) {
  const int64_t prev = reverse ? t + 1 : t - 1;
  return prev >= 0 && prev < T ? prev : -1;
}

// The backward time loop over the steps of one chunk at once
// (LstmStepKernels::chunk_backward), for a direction without projection or
// layer norm: steps s = first_s down to last_s of the backward walk (step
// t = s, or T - 1 - s in reverse), whose rows start at row_begin in the
// packed layout; steps, offsets and reverse as in LstmSequenceForward. From
// the forward pass gates, cells, output (N, .), h0 and c0 (B, H);
// grad_output (N, H); dh_state and dc_state (B, H): the gradients flowing
// back, in and out; grad_gates (>= the chunk's rows, 4H) out, the chunk's
// rows at their offset from row_begin; h_prev (likewise, H) out, or
// undefined: h_{t-1} as the recurrent product saw it (masked);
// grad_h_zoneout (B, H): scratch when zoneout_hidden is given; weight_hh
// (4H, H) and the regularisers. All contiguous.
struct LstmChunkBackward {
  const std::vector<int64_t>& steps;
  const std::vector<int64_t>& offsets;
  bool reverse;
  int64_t first_s, last_s, row_begin;
  at::Tensor gates, cells, output, h0, c0, grad_output, dh_state, dc_state, grad_gates, h_prev, weight_hh;
  at::Tensor recurrent_mask, zoneout_cell, zoneout_hidden, grad_h_zoneout;
};

// The per-step pointwise work of one device: activations, the cell update
// (c~_t = f * c_{t-1} + i * g, h~_t = o * tanh(c~_t), then zoneout) and
// their gradients. The backward recomputes c~_t from the gates and c_{t-1}.
// With layer normalisation the step also normalises the recurrent product
// and c~_t (per row) and back-propagates through both.
struct LstmStepKernels {
  void (*forward)(const LstmForwardStep& step);
  void (*backward)(const LstmBackwardStep& step);
  // Optional: out (N, G) = rstd * (d - mean(d) - norm * mean(d * norm)) per
  // row, d = grad * gain, rstd = ln_stats[:, 0]; the input half's LN backward,
  // all rows at once (all contiguous). nullptr: composed from ATen ops.
  void (*layer_norm_backward)(const at::Tensor& grad, const at::Tensor& norm, const at::Tensor& ln_stats,
                              const at::Tensor& gain, at::Tensor& out) = nullptr;
  // Optional: out = beta * out + a @ b (beta 0 or 1) for a per-step product
  // with few rows, where the device's own loops beat its BLAS; returns false,
  // touching nothing, where it does not apply. nullptr, or false: addmm_.
  bool (*few_rows_addmm)(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) = nullptr;
  int64_t few_rows_max = 0;  // rows up to which few_rows_addmm may take a product
  // Optional: for a right-hand matrix b (k, n) that a call multiplies by at
  // many steps, prepare_right returns b in a form, made once, that
  // prepared_matmul(a, prepared) multiplies by faster than addmm_ (returning
  // a @ b as a new tensor), or an undefined tensor where it has none; `rows`
  // is the row count of a typical step. nullptr: addmm_ at every step.
  at::Tensor (*prepare_right)(const at::Tensor& b, int64_t rows) = nullptr;
  at::Tensor (*prepared_matmul)(const at::Tensor& a, const at::Tensor& prepared) = nullptr;
  // Optional: the forward time loop of a direction without projection or
  // layer normalisation in one go, writing what the step loop would (the
  // activations into gates, c_state, h_state, cells, output); returns false,
  // touching nothing, where it does not apply. nullptr, or false: the step loop.
  bool (*sequence_forward)(const LstmSequenceForward& sequence) = nullptr;
  // Optional: its backward time loop in one go, writing what the step loop
  // would (grad_gates and h_prev for all rows, dh_state, dc_state), for a
  // backward that walks all rows as one chunk; returns false, touching
  // nothing, where it does not apply. nullptr, or false: the step loop.
  bool (*sequence_backward)(const LstmSequenceBackward& sequence) = nullptr;
  // Optional: the backward time loop over one chunk's steps in one go (the
  // CPU's, whose backward walks chunks of at least kCpuChunkRows rows),
  // writing what the step loop would for them (grad_gates and h_prev for the
  // chunk's rows, dh_state, dc_state); returns false, touching nothing,
  // where it does not apply. nullptr, or false: the step loop.
  bool (*chunk_backward)(const LstmChunkBackward& chunk) = nullptr;
  // Optional: a @ weight^T (+ bias, where defined) as a new tensor, for the
  // products over many rows (the input product, the input and weight
  // gradients), where the device has a faster path than ATen's; an undefined
  // tensor where it does not apply. nullptr, or undefined: ATen's mm.
  at::Tensor (*linear)(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias) = nullptr;
  // Undefined: the products take their operands in the tensors' dtype.
  // Otherwise the dtype their operands are rounded to (the CPU's bfloat16
  // kernels: csrc/cpu/lstm.cpp), while the state, the activations and what
  // is saved stay in the input's dtype; the products' results, in this
  // dtype, are added into those tensors. weight_ih and weight_hh may then
  // come in this dtype already (no copy is made of them). The hooks above
  // receive operands in this dtype and return results in it, except
  // few_rows_addmm, which receives the rows unrounded and rounds those it
  // multiplies by a weight's rows, the forward's, as it reads them (a copy
  // would cost as much as the product).
  c10::ScalarType product_dtype = c10::ScalarType::Undefined;
};

// Training-time regularisers, applied inside the time loop (all optional):
//   recurrent_mask (B, P): h_{t-1} enters the recurrent GEMM as
//     h_{t-1} * recurrent_mask (per-sequence recurrent dropout, Gal &
//     Ghahramani); the outputs and h_n are not masked;
//   zoneout_cell (N, H), zoneout_hidden (N, P): per-row zoneout weights z,
//     (Krueger et al.): state_t = z * state_{t-1} + (1 - z) * new_state_t;
//     Bernoulli(p) draws in training, p itself in evaluation.
struct LstmRegularisers {
  std::optional<at::Tensor> recurrent_mask, zoneout_cell, zoneout_hidden;
};

// Layer normalisation (Ba et al., 2016), all six or none: gains (weight) and
// biases of LN over the 4H pre-activations of x_t W_ih^T and of
// h_{t-1} W_hh^T, and over the H units of the cell before its tanh:
//   gates = LN_ih(x_t W_ih^T) + LN_hh(h_{t-1} W_hh^T) + bias_ih + bias_hh,
//   h~_t = o * tanh(LN_cell(c~_t)),  LN(v) = weight * (v - mean) * rstd + bias,
// rstd = 1 / sqrt(var + 1e-5) (biased variance), c_t = c~_t (before zoneout).
struct LstmLayerNorm {
  std::optional<at::Tensor> ih_weight, ih_bias, hh_weight, hh_bias, cell_weight, cell_bias;
  bool enabled() const { return ih_weight.has_value() && ih_weight->defined(); }
};

// What the forward pass saved for the backward one under layer norm.
struct LstmLayerNormSaved {
  std::optional<at::Tensor> norm_ih, norm_hh, ln_stats;
};

// Which of the backward's costly results are wanted: the input's gradient
// (one GEMM) and the parameters' (three GEMMs and the sums). An input that
// needs none (a frozen embedding under the first layer) or a frozen layer
// skips them; what is not wanted comes back empty. The input's values feed
// only the parameters' gradients: without them, `input` gives only its shape,
// dtype and device, and may be a broadcast stand-in (see lstm_autograd.cpp).
struct LstmGradientsWanted {
  bool input = true;
  bool weights = true;
};

constexpr double kLstmLayerNormEps = 1e-5;

// Checks shapes, dtypes and devices (raising c10::Error that names the
// argument) and returns the step sizes: batch_sizes as a vector, or B
// repeated N / B times for padded input. Every tensor must have input's
// dtype, except that weight_ih and weight_hh may have weights_dtype where
// it is given: the kernels' LstmStepKernels::product_dtype, which the CPU's
// bfloat16 call passes its weights in as they are (csrc/cpu/lstm.cpp).
std::vector<int64_t> lstm_check_inputs(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                                       const at::Tensor& c0, const at::Tensor& weight_ih,
                                       const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                                       const std::optional<at::Tensor>& bias_hh,
                                       const std::optional<at::Tensor>& weight_hr,
                                       c10::ScalarType weights_dtype = c10::ScalarType::Undefined);

// Every check lstm_forward_impl makes before it runs a kernel:
// lstm_check_inputs, then the regularisers' and the layer norm's shapes,
// dtypes and devices. Returns the step sizes. The reference backend
// (fastnlp.ops.lstm_layer) runs it too, through fastnlp._C.
std::vector<int64_t> lstm_check_forward_arguments(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& weight_hr,
    const LstmRegularisers& regularisers, const LstmLayerNorm& layer_norm,
    c10::ScalarType weights_dtype = c10::ScalarType::Undefined);

// Returns (output (N, P), h_n (B, P), c_n (B, H), gates (N, 4H), cells (N, H),
// norm_ih (N, 4H), norm_hh (N, 4H), ln_stats (N, 4)); all but the first three
// are saved for the backward pass (the last three are empty without layer norm).
using LstmForwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
LstmForwardResult lstm_forward_impl(
    const LstmStepKernels& kernels, const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr, bool reverse, const LstmRegularisers& regularisers,
    const LstmLayerNorm& layer_norm);

// Returns (grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh,
// grad_bias, grad_weight_hr); grad_bias is the gradient of both bias_ih and
// bias_hh (empty without bias), grad_weight_hr is empty without projection;
// then the gradients of the LN gains ih and hh, of both gate LN biases, and of
// the cell LN gain and bias (all empty without layer norm). grad_input, and
// everything after grad_c0, are empty where `wanted` says so.
using LstmBackwardResult =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
               at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
LstmBackwardResult lstm_backward_impl(
    const LstmStepKernels& kernels, const at::Tensor& grad_output, const at::Tensor& grad_h_n,
    const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& weight_hr, bool has_bias, bool reverse, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& cells, const LstmRegularisers& regularisers,
    const LstmLayerNorm& layer_norm, const LstmLayerNormSaved& saved, LstmGradientsWanted wanted);

// Both directions of one bidirectional layer: the lstm_forward_pair and
// lstm_backward_pair ops, whose per-direction argument lists csrc/ops.cpp
// describes. Each direction is lstm_forward_impl / lstm_backward_impl with
// reverse false, then true; each result list holds that function's outputs.
using LstmArgumentList = c10::List<std::optional<at::Tensor>>;
using LstmPairResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;
using LstmDirectionResults = std::array<std::vector<at::Tensor>, 2>;
using LstmDirection = std::function<std::vector<at::Tensor>(int64_t direction)>;
// How a device runs the two directions: calls direction(0) (forward) and
// direction(1) (reverse), one after the other or concurrently, and returns
// their results in that order (the CPU: a thread each; CUDA: a stream each).
using LstmRunBothDirections = LstmDirectionResults (*)(const LstmDirection& direction);

LstmPairResult lstm_forward_pair_impl(const LstmStepKernels& kernels, LstmRunBothDirections run_both,
                                      const at::Tensor& input, const at::Tensor& batch_sizes,
                                      const LstmArgumentList& forward_args, const LstmArgumentList& reverse_args);

LstmPairResult lstm_backward_pair_impl(const LstmStepKernels& kernels, LstmRunBothDirections run_both,
                                       const at::Tensor& input, const at::Tensor& batch_sizes, bool has_bias,
                                       const LstmArgumentList& forward_args, const LstmArgumentList& reverse_args,
                                       LstmGradientsWanted wanted);

}  // namespace fastnlp
