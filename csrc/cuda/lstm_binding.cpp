// CUDA implementations of the fastnlp LSTM ops (schemas in csrc/ops.cpp): the
// device-generic time loop of csrc/lstm.cpp, whose GEMMs run on cuBLAS
// through ATen, with the pointwise step kernels of lstm.cu (behind the
// torch-free lstm_step.h) as its LstmStepKernels.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "cuda/lstm_step.h"
#include "cuda/torch_cuda.h"
#include "lstm.h"

namespace fastnlp {
namespace {

namespace kern = ::fastnlp::cuda_impl;

// The loop hands the step functions row slices of contiguous buffers it
// allocated itself, plus the saved gates/cells that lstm_backward received;
// checking them here keeps a malformed direct call of lstm_backward from
// reading memory with the wrong layout or type.
void check_step_tensor(const at::Tensor& t, const char* name, const at::Tensor& gates, int64_t rows, int64_t cols) {
  TORCH_CHECK(is_cuda_tensor(t) && t.device() == gates.device(), "fastnlp.lstm (CUDA step): ", name, " is on ",
              t.device(), " but gates is on ", gates.device());
  TORCH_CHECK(t.scalar_type() == gates.scalar_type(), "fastnlp.lstm (CUDA step): ", name, " has dtype ",
              t.scalar_type(), " but gates has dtype ", gates.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "fastnlp.lstm (CUDA step): ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastnlp.lstm (CUDA step): ", name, " must be contiguous, got strides ",
              t.strides());
}

// T is the kernel-side element type; at::Half and at::BFloat16 have the same
// bits as __half and __nv_bfloat16, so the storage is passed through as is.
// An undefined tensor (an optional argument) becomes nullptr.
template <typename T>
const T* in_ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

template <typename T>
T* out_ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.mutable_data_ptr()) : nullptr;
}

// Calls f(T{}) with T the kernel-side element type of `dtype`.
template <typename F>
void with_kernel_type(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat:
      return f(float{});
    case at::kDouble:
      return f(double{});
    case at::kHalf:
      return f(__half{});
    case at::kBFloat16:
      return f(__nv_bfloat16{});
    default:
      TORCH_CHECK(false, "fastnlp.lstm: the CUDA kernel takes float32, float64, float16 or bfloat16, got ", dtype);
  }
}

void check_optional_step_tensor(const at::Tensor& t, const char* name, const at::Tensor& gates, int64_t rows,
                                int64_t cols) {
  if (t.defined()) check_step_tensor(t, name, gates, rows, cols);
}

// ln_stats (rows, 4): float, double for double input (ln_stat_t); a row
// slice of a contiguous (N, 4) buffer, so contiguous itself.
void check_ln_stats(const at::Tensor& t, const at::Tensor& gates, int64_t rows) {
  const at::ScalarType want = gates.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(is_cuda_tensor(t) && t.device() == gates.device() && t.scalar_type() == want && t.dim() == 2 &&
                  t.size(0) == rows && t.size(1) == 4 && t.is_contiguous(),
              "fastnlp.lstm (CUDA step): ln_stats must be a contiguous (", rows, ", 4) ", want, " tensor on ",
              gates.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

template <typename T>
kern::ln_stat_t<T>* stats_ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<kern::ln_stat_t<T>*>(t.mutable_data_ptr()) : nullptr;
}

// All layer-norm tensors of a step or none (the time loop passes all).
void check_layer_norm_step(bool ln, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t->defined() == ln, "fastnlp.lstm (CUDA step): a layer-norm step needs all of its tensors");
}

void forward_step_cuda(const LstmForwardStep& s) {
  const at::Tensor& gates = s.gates;
  const int64_t rows = gates.size(0), H = s.cells.size(1);
  check_step_tensor(gates, "gates", gates, rows, 4 * H);
  check_step_tensor(s.c_state, "c_state", gates, rows, H);
  check_step_tensor(s.cells, "cells", gates, rows, H);
  check_step_tensor(s.h_out, "h_out", gates, rows, H);
  check_optional_step_tensor(s.h_state, "h_state", gates, rows, H);
  check_optional_step_tensor(s.zoneout_cell, "zoneout_cell", gates, rows, H);
  check_optional_step_tensor(s.zoneout_hidden, "zoneout_hidden", gates, rows, H);
  const bool ln = s.norm_hh.defined();
  check_layer_norm_step(ln, {&s.ln_hh_weight, &s.ln_hh_bias, &s.ln_cell_weight, &s.ln_cell_bias, &s.ln_stats});
  if (ln) {
    check_step_tensor(s.norm_hh, "norm_hh", gates, rows, 4 * H);
    check_step_tensor(s.ln_hh_weight.view({1, -1}), "ln_hh_weight", gates, 1, 4 * H);
    check_step_tensor(s.ln_hh_bias.view({1, -1}), "ln_hh_bias", gates, 1, 4 * H);
    check_step_tensor(s.ln_cell_weight.view({1, -1}), "ln_cell_weight", gates, 1, H);
    check_step_tensor(s.ln_cell_bias.view({1, -1}), "ln_cell_bias", gates, 1, H);
    check_ln_stats(s.ln_stats, gates, rows);
  }
  const c10::cuda::OptionalCUDAGuard guard(gates.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_kernel_type(gates.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    kern::LstmForwardStepArgs<T> args{out_ptr<T>(gates),         out_ptr<T>(s.c_state),
                                      out_ptr<T>(s.cells),       out_ptr<T>(s.h_out),
                                      out_ptr<T>(s.h_state),     in_ptr<T>(s.zoneout_cell),
                                      in_ptr<T>(s.zoneout_hidden), rows,
                                      H};
    args.norm_hh = out_ptr<T>(s.norm_hh);
    args.ln_hh_weight = in_ptr<T>(s.ln_hh_weight);
    args.ln_hh_bias = in_ptr<T>(s.ln_hh_bias);
    args.ln_cell_weight = in_ptr<T>(s.ln_cell_weight);
    args.ln_cell_bias = in_ptr<T>(s.ln_cell_bias);
    args.ln_stats = stats_ptr<T>(s.ln_stats);
    C10_CUDA_CHECK(kern::lstm_forward_step(args, stream));
  });
}

void backward_step_cuda(const LstmBackwardStep& s) {
  const at::Tensor& gates = s.gates;
  const int64_t rows = gates.size(0), H = s.dc_state.size(1);
  TORCH_CHECK(s.rows_with_prev >= 0 && s.rows_with_prev <= rows,
              "fastnlp.lstm (CUDA step): rows_with_prev must be in [0, ", rows, "], got ", s.rows_with_prev);
  check_step_tensor(gates, "gates", gates, rows, 4 * H);
  check_step_tensor(s.c_prev, "c_prev", gates, s.rows_with_prev, H);
  // Rows from rows_with_prev on read c0 at their own row index.
  check_step_tensor(s.c0, "c0", gates, s.c0.size(0), H);
  TORCH_CHECK(s.c0.size(0) >= rows, "fastnlp.lstm (CUDA step): c0 has ", s.c0.size(0), " rows, fewer than ", rows);
  check_step_tensor(s.dh_a, "dh_a", gates, rows, H);
  check_optional_step_tensor(s.dh_b, "dh_b", gates, rows, H);
  check_step_tensor(s.dc_state, "dc_state", gates, rows, H);
  check_step_tensor(s.grad_gates, "grad_gates", gates, rows, 4 * H);
  check_optional_step_tensor(s.h_tilde, "h_tilde", gates, rows, H);
  check_optional_step_tensor(s.zoneout_cell, "zoneout_cell", gates, rows, H);
  check_optional_step_tensor(s.zoneout_hidden, "zoneout_hidden", gates, rows, H);
  check_optional_step_tensor(s.grad_h_prev, "grad_h_prev", gates, rows, H);
  const bool ln = s.norm_hh.defined();
  check_layer_norm_step(ln, {&s.ln_stats, &s.ln_hh_weight, &s.ln_cell_weight, &s.ln_cell_bias, &s.grad_rec,
                             &s.grad_ln_cell});
  if (ln) {
    check_step_tensor(s.norm_hh, "norm_hh", gates, rows, 4 * H);
    check_ln_stats(s.ln_stats, gates, rows);
    check_step_tensor(s.ln_hh_weight.view({1, -1}), "ln_hh_weight", gates, 1, 4 * H);
    check_step_tensor(s.ln_cell_weight.view({1, -1}), "ln_cell_weight", gates, 1, H);
    check_step_tensor(s.ln_cell_bias.view({1, -1}), "ln_cell_bias", gates, 1, H);
    check_step_tensor(s.grad_rec, "grad_rec", gates, rows, 4 * H);
    check_step_tensor(s.grad_ln_cell, "grad_ln_cell", gates, rows, 2 * H);
  }
  const c10::cuda::OptionalCUDAGuard guard(gates.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_kernel_type(gates.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    kern::LstmBackwardStepArgs<T> args{in_ptr<T>(gates),
                                             in_ptr<T>(s.c_prev),
                                             s.rows_with_prev,
                                             in_ptr<T>(s.c0),
                                             in_ptr<T>(s.dh_a),
                                             in_ptr<T>(s.dh_b),
                                             out_ptr<T>(s.dc_state),
                                             out_ptr<T>(s.grad_gates),
                                             out_ptr<T>(s.h_tilde),
                                             in_ptr<T>(s.zoneout_cell),
                                             in_ptr<T>(s.zoneout_hidden),
                                             out_ptr<T>(s.grad_h_prev),
                                             rows,
                                             H};
    args.norm_hh = in_ptr<T>(s.norm_hh);
    args.ln_stats = stats_ptr<T>(s.ln_stats);
    args.ln_hh_weight = in_ptr<T>(s.ln_hh_weight);
    args.ln_cell_weight = in_ptr<T>(s.ln_cell_weight);
    args.ln_cell_bias = in_ptr<T>(s.ln_cell_bias);
    args.grad_rec = out_ptr<T>(s.grad_rec);
    args.grad_ln_cell = out_ptr<T>(s.grad_ln_cell);
    C10_CUDA_CHECK(kern::lstm_backward_step(args, stream));
  });
}

// Where the whole-sequence kernels (kern::lstm_sequence_forward and
// lstm_sequence_backward) take a layer direction. Each of their blocks reads
// all of W_hh from the L2 cache at every step, so they are for a W_hh of at
// most a MiB (H <= 256 in float32, 362 in the half types), where that read
// should cost about what the step loop's launches and host work per step do;
// past a batch of 64 the blocks' W_hh reads (one per four sequences) should
// outweigh one GEMM. Both bounds are estimates, not yet measured on a GPU:
// the CUDA LSTM benchmark times the step loop beside them
// (FASTNLP_CUDA_LSTM_SEQUENCE_KERNEL=0).
constexpr int64_t kSequenceMaxWeightBytes = int64_t(1) << 20;
constexpr int64_t kSequenceMaxBatch = 64;

bool sequence_kernel_enabled() {
  const char* setting = std::getenv("FASTNLP_CUDA_LSTM_SEQUENCE_KERNEL");
  return setting == nullptr || std::string(setting) != "0";
}

// Whether the sequence kernels take a layer direction of B sequences, H
// units and gates' dtype.
bool sequence_kernels_take(const at::Tensor& gates, int64_t B, int64_t H) {
  const size_t compute_bytes = gates.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  const int64_t weight_bytes = 4 * H * H * static_cast<int64_t>(gates.element_size());
  return sequence_kernel_enabled() && B <= kSequenceMaxBatch && weight_bytes <= kSequenceMaxWeightBytes &&
         kern::lstm_sequence_kernels_fit(H, compute_bytes);
}

// The step bounds offsets[0..T], on the device: the offsets of the T steps
// (checked against their sizes) and where the last one ends, which must be N.
at::Tensor device_step_bounds(const std::vector<int64_t>& steps, const std::vector<int64_t>& offsets,
                              const at::Tensor& gates) {
  TORCH_CHECK(offsets.size() == steps.size(), "fastnlp.lstm (CUDA sequence): ", steps.size(), " steps but ",
              offsets.size(), " offsets");
  std::vector<int64_t> bounds(offsets);
  bounds.push_back(steps.empty() ? 0 : offsets.back() + steps.back());
  TORCH_CHECK(bounds.back() == gates.size(0), "fastnlp.lstm (CUDA sequence): the steps cover ", bounds.back(),
              " rows, not ", gates.size(0));
  return copy_to_device(bounds, gates.device());
}

bool sequence_forward_cuda(const LstmSequenceForward& s) {
  const at::Tensor& gates = s.gates;
  const int64_t B = s.h_state.size(0), H = s.c_state.size(1), N = gates.size(0);
  if (!sequence_kernels_take(gates, B, H)) return false;
  check_step_tensor(gates, "gates", gates, N, 4 * H);
  check_step_tensor(s.c_state, "c_state", gates, B, H);
  check_step_tensor(s.h_state, "h_state", gates, B, H);
  check_step_tensor(s.cells, "cells", gates, N, H);
  check_step_tensor(s.output, "output", gates, N, H);
  check_step_tensor(s.weight_hh, "weight_hh", gates, 4 * H, H);
  check_optional_step_tensor(s.recurrent_mask, "recurrent_mask", gates, B, H);
  check_optional_step_tensor(s.zoneout_cell, "zoneout_cell", gates, N, H);
  check_optional_step_tensor(s.zoneout_hidden, "zoneout_hidden", gates, N, H);
  const c10::cuda::OptionalCUDAGuard guard(gates.device());
  const at::Tensor bounds = device_step_bounds(s.steps, s.offsets, gates);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_kernel_type(gates.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const kern::LstmSequenceForwardArgs<T> args{bounds.const_data_ptr<int64_t>(),
                                                static_cast<int64_t>(s.steps.size()),
                                                B,
                                                H,
                                                s.reverse,
                                                out_ptr<T>(gates),
                                                out_ptr<T>(s.c_state),
                                                out_ptr<T>(s.h_state),
                                                out_ptr<T>(s.cells),
                                                out_ptr<T>(s.output),
                                                in_ptr<T>(s.weight_hh),
                                                in_ptr<T>(s.recurrent_mask),
                                                in_ptr<T>(s.zoneout_cell),
                                                in_ptr<T>(s.zoneout_hidden)};
    C10_CUDA_CHECK(kern::lstm_sequence_forward(args, stream));
  });
  return true;
}

bool sequence_backward_cuda(const LstmSequenceBackward& s) {
  const at::Tensor& gates = s.gates;
  const int64_t B = s.dh_state.size(0), H = s.dc_state.size(1), N = gates.size(0);
  if (!sequence_kernels_take(gates, B, H)) return false;
  check_step_tensor(gates, "gates", gates, N, 4 * H);
  check_step_tensor(s.cells, "cells", gates, N, H);
  check_step_tensor(s.output, "output", gates, N, H);
  check_step_tensor(s.h0, "h0", gates, B, H);
  check_step_tensor(s.c0, "c0", gates, B, H);
  check_step_tensor(s.grad_output, "grad_output", gates, N, H);
  check_step_tensor(s.dh_state, "dh_state", gates, B, H);
  check_step_tensor(s.dc_state, "dc_state", gates, B, H);
  check_step_tensor(s.grad_gates, "grad_gates", gates, N, 4 * H);
  check_optional_step_tensor(s.h_prev, "h_prev", gates, N, H);
  check_step_tensor(s.weight_hh, "weight_hh", gates, 4 * H, H);
  check_optional_step_tensor(s.recurrent_mask, "recurrent_mask", gates, B, H);
  check_optional_step_tensor(s.zoneout_cell, "zoneout_cell", gates, N, H);
  check_optional_step_tensor(s.zoneout_hidden, "zoneout_hidden", gates, N, H);
  check_optional_step_tensor(s.grad_h_zoneout, "grad_h_zoneout", gates, B, H);
  const c10::cuda::OptionalCUDAGuard guard(gates.device());
  const at::Tensor bounds = device_step_bounds(s.steps, s.offsets, gates);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  with_kernel_type(gates.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const kern::LstmSequenceBackwardArgs<T> args{bounds.const_data_ptr<int64_t>(),
                                                 static_cast<int64_t>(s.steps.size()),
                                                 B,
                                                 H,
                                                 s.reverse,
                                                 in_ptr<T>(gates),
                                                 in_ptr<T>(s.cells),
                                                 in_ptr<T>(s.output),
                                                 in_ptr<T>(s.h0),
                                                 in_ptr<T>(s.c0),
                                                 in_ptr<T>(s.grad_output),
                                                 out_ptr<T>(s.dh_state),
                                                 out_ptr<T>(s.dc_state),
                                                 out_ptr<T>(s.grad_gates),
                                                 out_ptr<T>(s.h_prev),
                                                 in_ptr<T>(s.weight_hh),
                                                 in_ptr<T>(s.recurrent_mask),
                                                 in_ptr<T>(s.zoneout_cell),
                                                 in_ptr<T>(s.zoneout_hidden),
                                                 out_ptr<T>(s.grad_h_zoneout)};
    C10_CUDA_CHECK(kern::lstm_sequence_backward(args, stream));
  });
  return true;
}

// The input half's LN backward (all rows at once) is composed from ATen ops
// here; cuBLAS takes every product, prepared or not.
constexpr LstmStepKernels kCudaKernels{&forward_step_cuda,
                                       &backward_step_cuda,
                                       /*layer_norm_backward=*/nullptr,
                                       /*few_rows_addmm=*/nullptr,
                                       /*few_rows_max=*/0,
                                       /*prepare_right=*/nullptr,
                                       /*prepared_matmul=*/nullptr,
                                       &sequence_forward_cuda,
                                       &sequence_backward_cuda};

void check_cuda_input(const at::Tensor& input) {
  TORCH_CHECK(is_cuda_tensor(input), "fastnlp.lstm: input must be a CUDA tensor here, got one on ", input.device());
  const at::ScalarType dtype = input.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastnlp.lstm: the CUDA kernel takes float32, float64, float16 or bfloat16, got ", dtype);
}

LstmForwardResult lstm_forward_cuda(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& weight_hr, bool reverse,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden, const std::optional<at::Tensor>& ln_ih_weight,
    const std::optional<at::Tensor>& ln_ih_bias, const std::optional<at::Tensor>& ln_hh_weight,
    const std::optional<at::Tensor>& ln_hh_bias, const std::optional<at::Tensor>& ln_cell_weight,
    const std::optional<at::Tensor>& ln_cell_bias) {
  check_cuda_input(input);
  // The whole loop, allocations and GEMMs included, on the input's device.
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  return lstm_forward_impl(kCudaKernels, input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                           weight_hr, reverse, LstmRegularisers{recurrent_mask, zoneout_cell, zoneout_hidden},
                           LstmLayerNorm{ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight,
                                         ln_cell_bias});
}

LstmBackwardResult lstm_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input,
    const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& weight_hr, bool has_bias, bool reverse,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden, const std::optional<at::Tensor>& ln_ih_weight,
    const std::optional<at::Tensor>& ln_hh_weight, const std::optional<at::Tensor>& ln_cell_weight,
    const std::optional<at::Tensor>& ln_cell_bias, const std::optional<at::Tensor>& norm_ih,
    const std::optional<at::Tensor>& norm_hh, const std::optional<at::Tensor>& ln_stats, bool input_grad,
    bool weight_grads) {
  check_cuda_input(input);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  return lstm_backward_impl(kCudaKernels, grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weight_ih,
                            weight_hh, weight_hr, has_bias, reverse, output, gates, cells,
                            LstmRegularisers{recurrent_mask, zoneout_cell, zoneout_hidden},
                            LstmLayerNorm{ln_ih_weight, std::nullopt, ln_hh_weight, std::nullopt, ln_cell_weight,
                                          ln_cell_bias},
                            LstmLayerNormSaved{norm_ih, norm_hh, ln_stats},
                            LstmGradientsWanted{input_grad, weight_grads});
}

// Both directions of a layer, each on a stream of its own: at the few rows of
// a step, one direction's products and step kernels leave most of the GPU
// idle, so the other's can run beside them.
LstmPairResult lstm_forward_pair_cuda(const at::Tensor& input, const at::Tensor& batch_sizes,
                                      const LstmArgumentList& forward_args, const LstmArgumentList& reverse_args) {
  check_cuda_input(input);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  return lstm_forward_pair_impl(kCudaKernels, &run_on_two_streams<LstmDirection>, input, batch_sizes, forward_args,
                                reverse_args);
}

LstmPairResult lstm_backward_pair_cuda(const at::Tensor& input, const at::Tensor& batch_sizes, bool has_bias,
                                       const LstmArgumentList& forward_args, const LstmArgumentList& reverse_args,
                                       bool input_grad, bool weight_grads) {
  check_cuda_input(input);
  const c10::cuda::OptionalCUDAGuard guard(input.device());
  return lstm_backward_pair_impl(kCudaKernels, &run_on_two_streams<LstmDirection>, input, batch_sizes, has_bias,
                                 forward_args, reverse_args, LstmGradientsWanted{input_grad, weight_grads});
}

}  // namespace
}  // namespace fastnlp

#ifndef FASTNLP_CUDA_EMULATION  // the emulation build calls the functions directly
TORCH_LIBRARY_IMPL(fastnlp, CUDA, m) {
  m.impl("lstm_forward", &fastnlp::lstm_forward_cuda);
  m.impl("lstm_backward", &fastnlp::lstm_backward_cuda);
  m.impl("lstm_forward_pair", &fastnlp::lstm_forward_pair_cuda);
  m.impl("lstm_backward_pair", &fastnlp::lstm_backward_pair_cuda);
}
#endif
