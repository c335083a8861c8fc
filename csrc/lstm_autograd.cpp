// Autograd for lstm_forward, registered once for every device; in C++ for
// the same reason as crf_autograd.cpp: a Python wrapper adds ~0.1 ms per call,
// which an LSTMCell step loop pays once per time step.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace fastnlp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using Forward =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using Backward = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

std::optional<at::Tensor> optional_tensor(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// The training-time masks: inputs of the op, but constants to autograd.
struct Regularisers {
  std::optional<at::Tensor> recurrent_mask, zoneout_cell, zoneout_hidden;
};

// Layer-norm gains and biases (all or none): parameters, so differentiable.
struct LayerNorm {
  std::optional<at::Tensor> ih_weight, ih_bias, hh_weight, hh_bias, cell_weight, cell_bias;
};

Forward call_forward(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
                     const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                     const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
                     const std::optional<at::Tensor>& weight_hr, bool reverse, const Regularisers& reg,
                     const LayerNorm& ln) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastnlp::lstm_forward", "")
          .typed<Forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, bool,
                         const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                         const std::optional<at::Tensor>&, const OptTensor&, const OptTensor&, const OptTensor&,
                         const OptTensor&, const OptTensor&, const OptTensor&)>();
  return op.call(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse,
                 reg.recurrent_mask, reg.zoneout_cell, reg.zoneout_hidden, ln.ih_weight, ln.ih_bias, ln.hh_weight,
                 ln.hh_bias, ln.cell_weight, ln.cell_bias);
}

Backward call_backward(const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n,
                       const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                       const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                       const std::optional<at::Tensor>& weight_hr, bool has_bias, bool reverse,
                       const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
                       const Regularisers& reg, const LayerNorm& ln, const OptTensor& norm_ih,
                       const OptTensor& norm_hh, const OptTensor& ln_stats) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastnlp::lstm_backward", "")
          .typed<Backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const std::optional<at::Tensor>&, bool, bool, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const OptTensor&,
                          const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                          const OptTensor&)>();
  return op.call(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weight_ih, weight_hh, weight_hr,
                 has_bias, reverse, output, gates, cells, reg.recurrent_mask, reg.zoneout_cell, reg.zoneout_hidden,
                 ln.ih_weight, ln.hh_weight, ln.cell_weight, ln.cell_bias, norm_ih, norm_hh, ln_stats);
}

class LstmLayer : public torch::autograd::Function<LstmLayer> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& batch_sizes,
                               const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& weight_ih,
                               const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                               const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& weight_hr,
                               bool reverse, const std::optional<at::Tensor>& recurrent_mask,
                               const std::optional<at::Tensor>& zoneout_cell,
                               const std::optional<at::Tensor>& zoneout_hidden, const OptTensor& ln_ih_weight,
                               const OptTensor& ln_ih_bias, const OptTensor& ln_hh_weight, const OptTensor& ln_hh_bias,
                               const OptTensor& ln_cell_weight, const OptTensor& ln_cell_bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Regularisers reg{recurrent_mask, zoneout_cell, zoneout_hidden};
    const LayerNorm ln{ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias};
    auto [output, h_n, c_n, gates, cells, norm_ih, norm_hh, ln_stats] = call_forward(
        input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse, reg, ln);
    const bool layer_norm = has_tensor(ln_ih_weight);
    const at::Tensor none;
    // Absent optional tensors are saved as undefined ones.
    ctx->save_for_backward({input, batch_sizes, h0, c0, weight_ih, weight_hh, weight_hr.value_or(at::Tensor()),
                            output, gates, cells, recurrent_mask.value_or(at::Tensor()),
                            zoneout_cell.value_or(at::Tensor()), zoneout_hidden.value_or(at::Tensor()),
                            ln_ih_weight.value_or(none), ln_hh_weight.value_or(none), ln_cell_weight.value_or(none),
                            ln_cell_bias.value_or(none), layer_norm ? norm_ih : none, layer_norm ? norm_hh : none,
                            layer_norm ? ln_stats : none});
    ctx->saved_data["has_bias"] = has_tensor(bias_ih) || has_tensor(bias_hh);
    ctx->saved_data["has_bias_ih"] = has_tensor(bias_ih);
    ctx->saved_data["has_bias_hh"] = has_tensor(bias_hh);
    ctx->saved_data["reverse"] = reverse;
    ctx->mark_non_differentiable({gates, cells, norm_ih, norm_hh, ln_stats});
    // Left on, autograd would zero-fill a gradient for gates and cells (N x 4H
    // and N x H) on every backward pass only for it to be ignored.
    ctx->set_materialize_grads(false);
    return {output, h_n, c_n, gates, cells, norm_ih, norm_hh, ln_stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const std::optional<at::Tensor> weight_hr = optional_tensor(s[6]);
    const Regularisers reg{optional_tensor(s[10]), optional_tensor(s[11]), optional_tensor(s[12])};
    const bool layer_norm = s[13].defined();
    const LayerNorm ln{optional_tensor(s[13]), std::nullopt, optional_tensor(s[14]), std::nullopt,
                       optional_tensor(s[15]), optional_tensor(s[16])};
    // An output that did not reach the loss has no gradient: zeros.
    const at::Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(s[7]);
    const at::Tensor grad_h_n = grads[1].defined() ? grads[1] : at::zeros_like(s[2]);
    const at::Tensor grad_c_n = grads[2].defined() ? grads[2] : at::zeros_like(s[3]);
    auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, grad_ln_ih_w, grad_ln_hh_w,
          grad_ln_gate_b, grad_ln_cell_w, grad_ln_cell_b] =
        call_backward(grad_output, grad_h_n, grad_c_n, s[0], s[1], s[2], s[3], s[4], s[5], weight_hr,
                      ctx->saved_data["has_bias"].toBool(), ctx->saved_data["reverse"].toBool(), s[7], s[8], s[9],
                      reg, ln, optional_tensor(s[17]), optional_tensor(s[18]), optional_tensor(s[19]));
    const at::Tensor none;
    return {grad_input,
            none,
            grad_h0,
            grad_c0,
            grad_w_ih,
            grad_w_hh,
            ctx->saved_data["has_bias_ih"].toBool() ? grad_bias : none,
            ctx->saved_data["has_bias_hh"].toBool() ? grad_bias : none,
            weight_hr ? grad_w_hr : none,
            none,
            none,
            none,
            none,
            layer_norm ? grad_ln_ih_w : none,
            layer_norm ? grad_ln_gate_b : none,
            layer_norm ? grad_ln_hh_w : none,
            layer_norm ? grad_ln_gate_b : none,
            layer_norm ? grad_ln_cell_w : none,
            layer_norm ? grad_ln_cell_b : none};
  }
};

Forward lstm_forward_autograd(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                              const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                              const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
                              const std::optional<at::Tensor>& weight_hr, bool reverse,
                              const std::optional<at::Tensor>& recurrent_mask,
                              const std::optional<at::Tensor>& zoneout_cell,
                              const std::optional<at::Tensor>& zoneout_hidden, const OptTensor& ln_ih_weight,
                              const OptTensor& ln_ih_bias, const OptTensor& ln_hh_weight, const OptTensor& ln_hh_bias,
                              const OptTensor& ln_cell_weight, const OptTensor& ln_cell_bias) {
  const variable_list out =
      LstmLayer::apply(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse,
                       recurrent_mask, zoneout_cell, zoneout_hidden, ln_ih_weight, ln_ih_bias, ln_hh_weight,
                       ln_hh_bias, ln_cell_weight, ln_cell_bias);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnlp, Autograd, m) {
  m.impl("lstm_forward", &lstm_forward_autograd);
}

}  // namespace fastnlp
