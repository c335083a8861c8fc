// LSTM on the CPU: the fused pointwise step kernels (gate activations, cell
// update and their gradients, one pass over the gates per step) plugged into
// the device-generic time loop of csrc/lstm.cpp, whose GEMMs run on
// MKL/oneDNN through ATen.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>

#include "cpu/vector_loops.h"
#include "lstm.h"

namespace fastnlp {
namespace {

// Activations in double whatever the storage type: the same vectorised exp
// serves float and double, and float results are correctly rounded.
__attribute__((always_inline)) inline double sigmoid(double x) { return 1.0 / (1.0 + vmath_detail::exp_one(-x)); }
__attribute__((always_inline)) inline double tanh_(double x) { return 1.0 - 2.0 / (1.0 + vmath_detail::exp_one(2.0 * x)); }

template <typename scalar_t>
__attribute__((always_inline)) inline void forward_row_impl(int64_t H, scalar_t* __restrict gates,
                                                            scalar_t* __restrict c_state, scalar_t* __restrict cells,
                                                            scalar_t* __restrict h_out, scalar_t* __restrict h_state) {
  scalar_t* gi = gates;
  scalar_t* gf = gates + H;
  scalar_t* gg = gates + 2 * H;
  scalar_t* go = gates + 3 * H;
  for (int64_t j = 0; j < H; ++j) {
    const double i = sigmoid(gi[j]), f = sigmoid(gf[j]), g = tanh_(gg[j]), o = sigmoid(go[j]);
    const double c = f * c_state[j] + i * g;
    const double h = o * tanh_(c);
    gi[j] = static_cast<scalar_t>(i);
    gf[j] = static_cast<scalar_t>(f);
    gg[j] = static_cast<scalar_t>(g);
    go[j] = static_cast<scalar_t>(o);
    c_state[j] = cells[j] = static_cast<scalar_t>(c);
    h_out[j] = static_cast<scalar_t>(h);
  }
  if (h_state != nullptr)
    for (int64_t j = 0; j < H; ++j) h_state[j] = h_out[j];
}

template <typename scalar_t, bool kTwoGradSources, bool kWriteTilde>
__attribute__((always_inline)) inline void backward_row_impl(int64_t H, const scalar_t* __restrict gates,
                                                             const scalar_t* __restrict cell,
                                                             const scalar_t* __restrict c_prev,
                                                             const scalar_t* __restrict dh_a,
                                                             const scalar_t* __restrict dh_b,
                                                             scalar_t* __restrict dc_state,
                                                             scalar_t* __restrict grad_gates,
                                                             scalar_t* __restrict h_tilde) {
  for (int64_t j = 0; j < H; ++j) {
    const double i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
    const double tc = tanh_(cell[j]);
    const double dh = kTwoGradSources ? double(dh_a[j]) + double(dh_b[j]) : double(dh_a[j]);
    const double dc = dc_state[j] + dh * o * (1.0 - tc * tc);
    grad_gates[j] = static_cast<scalar_t>(dc * g * i * (1.0 - i));
    grad_gates[H + j] = static_cast<scalar_t>(dc * c_prev[j] * f * (1.0 - f));
    grad_gates[2 * H + j] = static_cast<scalar_t>(dc * i * (1.0 - g * g));
    grad_gates[3 * H + j] = static_cast<scalar_t>(dh * tc * o * (1.0 - o));
    dc_state[j] = static_cast<scalar_t>(dc * f);
    if (kWriteTilde) h_tilde[j] = static_cast<scalar_t>(o * tc);
  }
}

// Each function is compiled for AVX2+FMA and the baseline ISA (see
// vector_loops.h); one call covers one row of H units.
#define FASTNLP_LSTM_ROW_KERNELS(scalar_t)                                                                       \
  FASTNLP_VECTOR_CLONES void forward_row(int64_t H, scalar_t* gates, scalar_t* c_state, scalar_t* cells,        \
                                         scalar_t* h_out, scalar_t* h_state) {                                  \
    forward_row_impl(H, gates, c_state, cells, h_out, h_state);                                                 \
  }                                                                                                             \
  FASTNLP_VECTOR_CLONES void backward_row(int64_t H, const scalar_t* gates, const scalar_t* cell,               \
                                          const scalar_t* c_prev, const scalar_t* dh_a, const scalar_t* dh_b,   \
                                          scalar_t* dc_state, scalar_t* grad_gates, scalar_t* h_tilde) {        \
    if (dh_b != nullptr)                                                                                        \
      backward_row_impl<scalar_t, true, false>(H, gates, cell, c_prev, dh_a, dh_b, dc_state, grad_gates, h_tilde); \
    else if (h_tilde != nullptr)                                                                                \
      backward_row_impl<scalar_t, false, true>(H, gates, cell, c_prev, dh_a, dh_b, dc_state, grad_gates, h_tilde); \
    else                                                                                                        \
      backward_row_impl<scalar_t, false, false>(H, gates, cell, c_prev, dh_a, dh_b, dc_state, grad_gates,       \
                                                h_tilde);                                                       \
  }
FASTNLP_LSTM_ROW_KERNELS(float)
FASTNLP_LSTM_ROW_KERNELS(double)
#undef FASTNLP_LSTM_ROW_KERNELS

// Rows are split across threads only when each thread gets enough units to
// pay for waking it.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)); }

template <typename scalar_t>
scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

void forward_step_cpu(const at::Tensor& gates, const at::Tensor& c_state, const at::Tensor& cells,
                      const at::Tensor& h_out, const at::Tensor& h_state) {
  const int64_t rows = gates.size(0), H = cells.size(1);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_forward_step_cpu", [&] {
    scalar_t* g = gates.data_ptr<scalar_t>();
    scalar_t* cs = c_state.data_ptr<scalar_t>();
    scalar_t* cl = cells.data_ptr<scalar_t>();
    scalar_t* ho = h_out.data_ptr<scalar_t>();
    scalar_t* hs = ptr_or_null<scalar_t>(h_state);
    at::parallel_for(0, rows, row_grain(H), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        forward_row(H, g + r * 4 * H, cs + r * H, cl + r * H, ho + r * H, hs ? hs + r * H : nullptr);
    });
  });
}

void backward_step_cpu(const at::Tensor& gates, const at::Tensor& cells, const at::Tensor& c_prev,
                       int64_t rows_with_prev, const at::Tensor& c0, const at::Tensor& dh_a, const at::Tensor& dh_b,
                       const at::Tensor& dc_state, const at::Tensor& grad_gates, const at::Tensor& h_tilde) {
  const int64_t rows = gates.size(0), H = cells.size(1);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_backward_step_cpu", [&] {
    const scalar_t* g = gates.data_ptr<scalar_t>();
    const scalar_t* cl = cells.data_ptr<scalar_t>();
    const scalar_t* cp = rows_with_prev > 0 ? c_prev.data_ptr<scalar_t>() : nullptr;
    const scalar_t* c0p = c0.data_ptr<scalar_t>();
    const scalar_t* da = dh_a.data_ptr<scalar_t>();
    const scalar_t* db = ptr_or_null<scalar_t>(dh_b);
    scalar_t* dc = dc_state.data_ptr<scalar_t>();
    scalar_t* dg = grad_gates.data_ptr<scalar_t>();
    scalar_t* ht = ptr_or_null<scalar_t>(h_tilde);
    at::parallel_for(0, rows, row_grain(H), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        // A row whose first step this is reads c0.
        const scalar_t* prev_row = r < rows_with_prev ? cp + r * H : c0p + r * H;
        backward_row(H, g + r * 4 * H, cl + r * H, prev_row, da + r * H, db ? db + r * H : nullptr, dc + r * H,
                     dg + r * 4 * H, ht ? ht + r * H : nullptr);
      }
    });
  });
}

constexpr LstmStepKernels kCpuKernels{&forward_step_cpu, &backward_step_cpu};

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "fastnlp.lstm: the CPU kernel takes float32 or float64, got ", input.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_forward_cpu(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& weight_hr, bool reverse) {
  check_cpu_dtype(input);
  return lstm_forward_impl(kCpuKernels, input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                           reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input,
    const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& weight_hr, bool has_bias, bool reverse,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells) {
  check_cpu_dtype(input);
  return lstm_backward_impl(kCpuKernels, grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weight_ih,
                            weight_hh, weight_hr, has_bias, reverse, output, gates, cells);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnlp, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
}

}  // namespace fastnlp
