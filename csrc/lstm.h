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

#include <optional>
#include <tuple>

namespace fastnlp {

struct LstmStepKernels {
  // One forward step over the first `rows` sequences:
  //   gates (rows, 4H): pre-activations in, activations (sigmoid/tanh) out;
  //   c_state (rows, H): c_{t-1} in, c_t out; cells (rows, H): c_t out;
  //   h_out (rows, H): o * tanh(c_t) out; h_state (rows, H): the same again,
  //   or undefined when a projection follows (the caller writes h_state).
  void (*forward)(const at::Tensor& gates, const at::Tensor& c_state, const at::Tensor& cells,
                  const at::Tensor& h_out, const at::Tensor& h_state);
  // One backward step over the first `rows` sequences:
  //   gates, cells: what forward saved for this step; c_prev: c_{t-1} of the
  //   first `rows_with_prev` rows, the rest read from c0 (rows start there);
  //   dh (rows, H) = dh_a + dh_b (dh_b may be undefined): gradient w.r.t.
  //   o * tanh(c_t); dc_state (rows, H): gradient w.r.t. c_t in, w.r.t.
  //   c_{t-1} out; grad_gates (rows, 4H) out: w.r.t. the pre-activations;
  //   h_tilde (rows, H), if defined: o * tanh(c_t) out (the projection's input).
  void (*backward)(const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& c_prev,
                   int64_t rows_with_prev, const at::Tensor& c0, const at::Tensor& dh_a, const at::Tensor& dh_b,
                   const at::Tensor& dc_state, const at::Tensor& grad_gates, const at::Tensor& h_tilde);
};

// Checks shapes, dtypes and devices (raising c10::Error that names the
// argument) and returns the step sizes: batch_sizes as a vector, or B
// repeated N / B times for padded input.
std::vector<int64_t> lstm_check_inputs(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                                       const at::Tensor& c0, const at::Tensor& weight_ih,
                                       const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                                       const std::optional<at::Tensor>& bias_hh,
                                       const std::optional<at::Tensor>& weight_hr);

// Returns (output (N, P), h_n (B, P), c_n (B, H), gates (N, 4H), cells (N, H));
// gates and cells are saved for the backward pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_impl(
    const LstmStepKernels& kernels, const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr, bool reverse);

// Returns (grad_input, grad_h0, grad_c0, grad_weight_ih, grad_weight_hh,
// grad_bias, grad_weight_hr); grad_bias is the gradient of both bias_ih and
// bias_hh (empty without bias), grad_weight_hr is empty without projection.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_impl(
    const LstmStepKernels& kernels, const at::Tensor& grad_output, const at::Tensor& grad_h_n,
    const at::Tensor& grad_c_n, const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& weight_hr, bool has_bias, bool reverse, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& cells);

}  // namespace fastnlp
