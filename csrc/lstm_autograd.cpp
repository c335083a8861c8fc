// Autograd for lstm_forward, registered once for every device; in C++ for
// the same reason as crf_autograd.cpp: a Python wrapper adds ~0.1 ms per call,
// which an LSTMCell step loop pays once per time step.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "double_backward.h"

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

// A mask that requires grad would get none (the backward returns no gradient
// for it), a silently wrong zero for whoever asked: refused instead, before
// the kernel runs.
void refuse_regulariser_grads(const Regularisers& reg) {
  for (const auto& [mask, name] : {std::make_pair(&reg.recurrent_mask, "recurrent_mask"),
                                   std::make_pair(&reg.zoneout_cell, "zoneout_cell"),
                                   std::make_pair(&reg.zoneout_hidden, "zoneout_hidden")})
    TORCH_CHECK(!(mask->has_value() && (*mask)->defined() && (*mask)->requires_grad() && at::GradMode::is_enabled()),
                "fastnlp.lstm: ", name, " is a constant to autograd (no gradient flows to it) but requires grad; "
                "pass ", name, ".detach()");
}

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
                       const OptTensor& norm_hh, const OptTensor& ln_stats, bool input_grad, bool weight_grads) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastnlp::lstm_backward", "")
          .typed<Backward(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const at::Tensor&, const std::optional<at::Tensor>&, bool, bool, const at::Tensor&,
                          const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, const OptTensor&,
                          const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                          const OptTensor&, bool, bool)>();
  return op.call(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, weight_ih, weight_hh, weight_hr,
                 has_bias, reverse, output, gates, cells, reg.recurrent_mask, reg.zoneout_cell, reg.zoneout_hidden,
                 ln.ih_weight, ln.hh_weight, ln.cell_weight, ln.cell_bias, norm_ih, norm_hh, ln_stats, input_grad,
                 weight_grads);
}

// Whether autograd wants the gradient of any of the inputs with edge
// indices in [first, last). Edges are numbered over the tensors autograd was
// handed, in argument order, absent optional tensors and non-tensors skipped.
bool any_input_grad_needed(const AutogradContext* ctx, size_t first, size_t last) {
  for (size_t e = first; e < last; ++e)
    if (ctx->needs_input_grad(e)) return true;
  return false;
}

bool any_requires_grad(std::initializer_list<const OptTensor*> tensors) {
  return std::any_of(tensors.begin(), tensors.end(),
                     [](const OptTensor* t) { return has_tensor(*t) && (*t)->requires_grad(); });
}

// The input's values feed only the parameters' gradients (grad_weight_ih)
// and the reference backward (double_backward.h), which recomputes the layer.
// An input made under inference_mode, which autograd refuses to save, is not
// saved where no parameter requires grad (a frozen layer), so that it works
// as in torch.nn.LSTMCell. No parameter edge then exists, so the kernel's
// backward never wants weight gradients, and it reads only the stand-in's
// shape, dtype and device: one element, broadcast.
bool input_is_saved(const at::Tensor& input, bool parameters_need_grad) {
  return parameters_need_grad || !input.is_inference();
}

at::Tensor saved_input_or_stand_in(const at::Tensor& saved_input, const at::Tensor& output,
                                   const at::Tensor& weight_ih, bool weight_grads) {
  if (saved_input.defined()) return saved_input;
  TORCH_INTERNAL_ASSERT(!weight_grads, "fastnlp.lstm: weight gradients wanted but the input was not saved");
  return at::zeros({}, output.options()).expand({output.size(0), weight_ih.size(1)});
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
    const bool parameters_need_grad =  // see saved_input_or_stand_in
        weight_ih.requires_grad() || weight_hh.requires_grad() ||
        any_requires_grad({&bias_ih, &bias_hh, &weight_hr, &ln_ih_weight, &ln_ih_bias, &ln_hh_weight, &ln_hh_bias,
                           &ln_cell_weight, &ln_cell_bias});
    // Absent optional tensors are saved as undefined ones.
    ctx->save_for_backward({input_is_saved(input, parameters_need_grad) ? input : none, batch_sizes, h0, c0,
                            weight_ih, weight_hh, weight_hr.value_or(at::Tensor()), output, gates, cells,
                            recurrent_mask.value_or(at::Tensor()), zoneout_cell.value_or(at::Tensor()),
                            zoneout_hidden.value_or(at::Tensor()),
                            ln_ih_weight.value_or(none), ln_hh_weight.value_or(none), ln_cell_weight.value_or(none),
                            ln_cell_bias.value_or(none), layer_norm ? norm_ih : none, layer_norm ? norm_hh : none,
                            layer_norm ? ln_stats : none,
                            // What only the reference backward reads.
                            bias_ih.value_or(none), bias_hh.value_or(none), ln_ih_bias.value_or(none),
                            ln_hh_bias.value_or(none)});
    ctx->saved_data["has_bias"] = has_tensor(bias_ih) || has_tensor(bias_hh);
    ctx->saved_data["has_bias_ih"] = has_tensor(bias_ih);
    ctx->saved_data["has_bias_hh"] = has_tensor(bias_hh);
    ctx->saved_data["reverse"] = reverse;
    // The edges: input 0, batch_sizes 1, h0 2, c0 3, weight_ih 4, weight_hh 5,
    // then the optional tensors given: parameters, and the regularisers,
    // which never require grad (lstm_forward_autograd refuses them).
    int64_t edges = 6;
    for (const OptTensor* t : {&bias_ih, &bias_hh, &weight_hr, &recurrent_mask, &zoneout_cell, &zoneout_hidden,
                               &ln_ih_weight, &ln_ih_bias, &ln_hh_weight, &ln_hh_bias, &ln_cell_weight,
                               &ln_cell_bias})
      edges += has_tensor(*t);
    ctx->saved_data["edges"] = edges;
    ctx->mark_non_differentiable({gates, cells, norm_ih, norm_hh, ln_stats});
    // Left on, autograd would zero-fill a gradient for gates and cells (N x 4H
    // and N x H) on every backward pass only for it to be ignored.
    ctx->set_materialize_grads(false);
    return {output, h_n, c_n, gates, cells, norm_ih, norm_hh, ln_stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    return run_backward([&] { return gradients(ctx, s, grads); },
                        [&] { return reference_gradients(ctx, s, grads); });
  }

 private:
  // lstm_forward's arguments, in its schema's order, from what forward saved.
  static std::vector<c10::IValue> arguments(AutogradContext* ctx, const variable_list& s) {
    TORCH_CHECK(s[0].defined(), "fastnlp::lstm_forward cannot be differentiated twice where its input is an "
                "inference tensor (made under torch.inference_mode)");
    const auto opt = [](const at::Tensor& t) -> c10::IValue { return optional_tensor(t); };
    return {s[0], s[1], s[2], s[3], s[4], s[5], opt(s[20]), opt(s[21]), opt(s[6]),
            ctx->saved_data["reverse"].toBool(), opt(s[10]), opt(s[11]), opt(s[12]), opt(s[13]), opt(s[22]),
            opt(s[14]), opt(s[23]), opt(s[15]), opt(s[16])};
  }

  static variable_list reference_gradients(AutogradContext* ctx, const variable_list& s,
                                           const variable_list& grads) {
    return reference_backward("fastnlp::lstm_forward", arguments(ctx, s), {grads[0], grads[1], grads[2]});
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& s, const variable_list& grads) {
    const std::optional<at::Tensor> weight_hr = optional_tensor(s[6]);
    const Regularisers reg{optional_tensor(s[10]), optional_tensor(s[11]), optional_tensor(s[12])};
    const bool layer_norm = s[13].defined();
    const LayerNorm ln{optional_tensor(s[13]), std::nullopt, optional_tensor(s[14]), std::nullopt,
                       optional_tensor(s[15]), optional_tensor(s[16])};
    // An output that did not reach the loss has no gradient: zeros.
    const at::Tensor grad_output = grads[0].defined() ? grads[0] : at::zeros_like(s[7]);
    const at::Tensor grad_h_n = grads[1].defined() ? grads[1] : at::zeros_like(s[2]);
    const at::Tensor grad_c_n = grads[2].defined() ? grads[2] : at::zeros_like(s[3]);
    // The products of what autograd does not want are skipped: edges 0
    // (input) and 4 on (the parameters; see forward).
    const bool input_grad = ctx->needs_input_grad(0);
    const bool weight_grads = any_input_grad_needed(ctx, 4, static_cast<size_t>(ctx->saved_data["edges"].toInt()));
    auto [grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, grad_ln_ih_w, grad_ln_hh_w,
          grad_ln_gate_b, grad_ln_cell_w, grad_ln_cell_b] =
        call_backward(grad_output, grad_h_n, grad_c_n, saved_input_or_stand_in(s[0], s[7], s[4], weight_grads),
                      s[1], s[2], s[3], s[4], s[5], weight_hr,
                      ctx->saved_data["has_bias"].toBool(), ctx->saved_data["reverse"].toBool(), s[7], s[8], s[9],
                      reg, ln, optional_tensor(s[17]), optional_tensor(s[18]), optional_tensor(s[19]), input_grad,
                      weight_grads);
    const at::Tensor none;
    const auto weight = [&](bool present, const at::Tensor& grad) { return present && weight_grads ? grad : none; };
    return {input_grad ? grad_input : none,
            none,
            grad_h0,
            grad_c0,
            weight(true, grad_w_ih),
            weight(true, grad_w_hh),
            weight(ctx->saved_data["has_bias_ih"].toBool(), grad_bias),
            weight(ctx->saved_data["has_bias_hh"].toBool(), grad_bias),
            weight(weight_hr.has_value(), grad_w_hr),
            none,
            none,
            none,
            none,
            weight(layer_norm, grad_ln_ih_w),
            weight(layer_norm, grad_ln_gate_b),
            weight(layer_norm, grad_ln_hh_w),
            weight(layer_norm, grad_ln_gate_b),
            weight(layer_norm, grad_ln_cell_w),
            weight(layer_norm, grad_ln_cell_b)};
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
  refuse_regulariser_grads({recurrent_mask, zoneout_cell, zoneout_hidden});
  const variable_list out =
      LstmLayer::apply(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, reverse,
                       recurrent_mask, zoneout_cell, zoneout_hidden, ln_ih_weight, ln_ih_bias, ln_hh_weight,
                       ln_hh_bias, ln_cell_weight, ln_cell_bias);
  return {out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7]};
}

// ---------------------------------------------------------------------------
// lstm_forward_pair: both directions of a layer in one node, so that the
// backward pass runs them concurrently too (see csrc/cpu/lstm.cpp).

using OptionalTensors = c10::List<std::optional<at::Tensor>>;
using PairResult = std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>>;

constexpr size_t kPairForwardArgs = 16;   // h0 .. layer_norm_cell_bias, as in the schema
constexpr size_t kPairBackwardArgs = 21;  // grad_output .. ln_stats
constexpr size_t kForwardOutputs = 8;
constexpr size_t kPairRecurrentMask = 7;  // then zoneout_cell, zoneout_hidden, as in the schema

OptionalTensors to_optional_list(at::TensorList tensors) {
  OptionalTensors list;
  list.reserve(tensors.size());
  for (const at::Tensor& t : tensors) list.push_back(optional_tensor(t));
  return list;
}

PairResult call_forward_pair(const at::Tensor& input, const at::Tensor& batch_sizes, const OptionalTensors& forward_args,
                             const OptionalTensors& reverse_args) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnlp::lstm_forward_pair", "")
                             .typed<PairResult(const at::Tensor&, const at::Tensor&, const OptionalTensors&,
                                               const OptionalTensors&)>();
  return op.call(input, batch_sizes, forward_args, reverse_args);
}

PairResult call_backward_pair(const at::Tensor& input, const at::Tensor& batch_sizes, bool has_bias,
                              const OptionalTensors& forward_args, const OptionalTensors& reverse_args,
                              bool input_grad, bool weight_grads) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnlp::lstm_backward_pair", "")
                             .typed<PairResult(const at::Tensor&, const at::Tensor&, bool, const OptionalTensors&,
                                               const OptionalTensors&, bool, bool)>();
  return op.call(input, batch_sizes, has_bias, forward_args, reverse_args, input_grad, weight_grads);
}

// Whether entry k of a direction's argument list is a parameter (weights,
// biases, layer norm) rather than a state (h0, c0) or a regulariser.
bool is_pair_parameter(size_t entry) {
  return entry >= 2 && (entry < kPairRecurrentMask || entry >= kPairRecurrentMask + 3);
}

// What one direction's backward needs, saved in this order after input and batch_sizes.
enum PairSaved : size_t {
  kH0, kC0, kWeightIh, kWeightHh, kWeightHr, kOutput, kGates, kCells, kRecurrentMask, kZoneoutCell,
  kZoneoutHidden, kLnIhWeight, kLnHhWeight, kLnCellWeight, kLnCellBias, kNormIh, kNormHh, kLnStats,
  // What only the reference backward reads.
  kBiasIh, kBiasHh, kLnIhBias, kLnHhBias, kSavedPerDirection
};

class LstmPair : public torch::autograd::Function<LstmPair> {
 public:
  // present: the tensors both directions' argument lists hold; layout[k], for
  // the k-th entry of the two lists in turn, its index in present or -1 for
  // None. (Autograd takes absent optional tensors only as separate arguments,
  // not inside a list.)
  static variable_list forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& batch_sizes,
                               at::TensorList present, const std::vector<int64_t>& layout) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    TORCH_CHECK(layout.size() == 2 * kPairForwardArgs, "fastnlp.lstm pair: each direction takes ",
                kPairForwardArgs, " tensors");
    std::array<std::vector<at::Tensor>, 2> args;
    for (size_t k = 0; k < layout.size(); ++k)
      args[k / kPairForwardArgs].push_back(layout[k] >= 0 ? present[layout[k]] : at::Tensor());
    auto [forward_out, reverse_out] =
        call_forward_pair(input, batch_sizes, to_optional_list(args[0]), to_optional_list(args[1]));
    const std::array<const std::vector<at::Tensor>*, 2> outs{&forward_out, &reverse_out};
    bool parameters_need_grad = false;  // see saved_input_or_stand_in
    for (const std::vector<at::Tensor>& a : args)
      for (size_t k = 0; k < kPairForwardArgs; ++k)
        parameters_need_grad |= is_pair_parameter(k) && a[k].defined() && a[k].requires_grad();
    std::vector<at::Tensor> saved{input_is_saved(input, parameters_need_grad) ? input : at::Tensor(), batch_sizes};
    variable_list outputs;
    for (size_t d = 0; d < 2; ++d) {
      const std::vector<at::Tensor>& a = args[d];
      const std::vector<at::Tensor>& o = *outs[d];
      const bool layer_norm = a[10].defined();
      const at::Tensor none;
      // Indexed by PairSaved.
      saved.insert(saved.end(), {a[0], a[1], a[2], a[3], a[6], o[0], o[3], o[4], a[7], a[8], a[9], a[10], a[12],
                                 a[14], a[15], layer_norm ? o[5] : none, layer_norm ? o[6] : none,
                                 layer_norm ? o[7] : none, a[4], a[5], a[11], a[13]});
      TORCH_CHECK(a[4].defined() == args[0][4].defined() && a[5].defined() == args[0][5].defined(),
                  "fastnlp.lstm pair: both directions must agree on which biases they have");
      outputs.insert(outputs.end(), o.begin(), o.end());
    }
    ctx->save_for_backward(saved);
    ctx->saved_data["has_bias_ih"] = args[0][4].defined();
    ctx->saved_data["has_bias_hh"] = args[0][5].defined();
    ctx->saved_data["layout"] = layout;
    // Gates, cells and the layer-norm statistics (outputs 3..7 of each direction).
    variable_list not_differentiable;
    for (size_t d = 0; d < 2; ++d)
      for (size_t i = 3; i < kForwardOutputs; ++i) not_differentiable.push_back(outputs[d * kForwardOutputs + i]);
    ctx->mark_non_differentiable(not_differentiable);
    ctx->set_materialize_grads(false);
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    return run_backward([&] { return gradients(ctx, s, grads); },
                        [&] { return reference_gradients(ctx, s, grads); });
  }

 private:
  // Each direction through lstm_forward's reference backward in turn: the
  // pair computes what the two lstm_forward calls would.
  static variable_list reference_gradients(AutogradContext* ctx, const variable_list& s,
                                           const variable_list& grads) {
    TORCH_CHECK(s[0].defined(), "fastnlp::lstm_forward_pair cannot be differentiated twice where its input is an "
                "inference tensor (made under torch.inference_mode)");
    const auto opt = [](const at::Tensor& t) -> c10::IValue { return optional_tensor(t); };
    at::Tensor grad_input;
    variable_list by_entry;  // one gradient per entry of the two argument lists, as in gradients()
    for (size_t d = 0; d < 2; ++d) {
      const at::Tensor* v = s.data() + 2 + d * kSavedPerDirection;
      const at::Tensor* g = grads.data() + d * kForwardOutputs;
      const variable_list r = reference_backward(
          "fastnlp::lstm_forward",
          {s[0], s[1], v[kH0], v[kC0], v[kWeightIh], v[kWeightHh], opt(v[kBiasIh]), opt(v[kBiasHh]),
           opt(v[kWeightHr]), d == 1, opt(v[kRecurrentMask]), opt(v[kZoneoutCell]), opt(v[kZoneoutHidden]),
           opt(v[kLnIhWeight]), opt(v[kLnIhBias]), opt(v[kLnHhWeight]), opt(v[kLnHhBias]), opt(v[kLnCellWeight]),
           opt(v[kLnCellBias])},
          {g[0], g[1], g[2]});
      if (r[0].defined()) grad_input = grad_input.defined() ? grad_input + r[0] : r[0];
      // lstm_forward's arguments after `reverse` (r[9]) are the list's, from h0 (r[2]) on.
      by_entry.insert(by_entry.end(), r.begin() + 2, r.begin() + 9);
      by_entry.insert(by_entry.end(), r.begin() + 10, r.end());
    }
    return pair_result(ctx, grad_input, by_entry);
  }

  // Autograd's gradients for forward's arguments: input, batch_sizes, then
  // present (each list entry's gradient to its place), then the layout.
  static variable_list pair_result(AutogradContext* ctx, const at::Tensor& grad_input,
                                   const variable_list& by_entry) {
    const std::vector<int64_t> layout = ctx->saved_data["layout"].toIntVector();
    variable_list result{grad_input, at::Tensor()};
    result.resize(2 + std::count_if(layout.begin(), layout.end(), [](int64_t i) { return i >= 0; }));
    for (size_t k = 0; k < layout.size(); ++k)
      if (layout[k] >= 0) result[2 + layout[k]] = by_entry[k];
    result.push_back(at::Tensor());  // layout
    return result;
  }

  static variable_list gradients(AutogradContext* ctx, const variable_list& s, const variable_list& grads) {
    const bool has_bias_ih = ctx->saved_data["has_bias_ih"].toBool();
    const bool has_bias_hh = ctx->saved_data["has_bias_hh"].toBool();
    std::array<OptionalTensors, 2> lists;
    for (size_t d = 0; d < 2; ++d) {
      const at::Tensor* v = s.data() + 2 + d * kSavedPerDirection;
      const at::Tensor* g = grads.data() + d * kForwardOutputs;
      // An output that did not reach the loss has no gradient: zeros.
      const at::Tensor grad_output = g[0].defined() ? g[0] : at::zeros_like(v[kOutput]);
      const at::Tensor grad_h_n = g[1].defined() ? g[1] : at::zeros_like(v[kH0]);
      const at::Tensor grad_c_n = g[2].defined() ? g[2] : at::zeros_like(v[kC0]);
      lists[d] = to_optional_list({grad_output, grad_h_n, grad_c_n, v[kH0], v[kC0], v[kWeightIh], v[kWeightHh],
                                   v[kWeightHr], v[kOutput], v[kGates], v[kCells], v[kRecurrentMask],
                                   v[kZoneoutCell], v[kZoneoutHidden], v[kLnIhWeight], v[kLnHhWeight],
                                   v[kLnCellWeight], v[kLnCellBias], v[kNormIh], v[kNormHh], v[kLnStats]});
    }
    // The edges: input 0, batch_sizes 1, then present[i] at 2 + i. A
    // parameter of either direction that needs its gradient makes the op
    // compute both directions' (h0, c0 and the regularisers are not
    // parameters).
    const std::vector<int64_t> layout = ctx->saved_data["layout"].toIntVector();
    bool weight_grads = false;
    for (size_t k = 0; k < layout.size(); ++k) {
      if (is_pair_parameter(k % kPairForwardArgs) && layout[k] >= 0 && ctx->needs_input_grad(2 + layout[k]))
        weight_grads = true;
    }
    const bool input_grad = ctx->needs_input_grad(0);
    const at::Tensor* forward_saved = s.data() + 2;
    const at::Tensor input = saved_input_or_stand_in(s[0], forward_saved[kOutput], forward_saved[kWeightIh],
                                                     weight_grads);
    auto [forward_grads, reverse_grads] = call_backward_pair(input, s[1], has_bias_ih || has_bias_hh, lists[0],
                                                             lists[1], input_grad, weight_grads);
    const at::Tensor none;
    variable_list by_entry;  // one gradient per entry of the two argument lists
    const std::array<const std::vector<at::Tensor>*, 2> dir_grads{&forward_grads, &reverse_grads};
    for (size_t d = 0; d < 2; ++d) {
      const std::vector<at::Tensor>& g = *dir_grads[d];
      const at::Tensor* v = s.data() + 2 + d * kSavedPerDirection;
      const bool layer_norm = v[kLnIhWeight].defined();
      // In schema order: h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, the three regularisers,
      // then the six layer-norm tensors (the two gate biases share one gradient).
      const auto weight = [&](bool present, size_t index) { return present && weight_grads ? g[index] : none; };
      by_entry.insert(by_entry.end(),
                      {g[1], g[2], weight(true, 3), weight(true, 4), weight(has_bias_ih, 5), weight(has_bias_hh, 5),
                       weight(v[kWeightHr].defined(), 6), none, none, none, weight(layer_norm, 7),
                       weight(layer_norm, 9), weight(layer_norm, 8), weight(layer_norm, 9), weight(layer_norm, 10),
                       weight(layer_norm, 11)});
    }
    return pair_result(ctx, input_grad ? at::add(forward_grads[0], reverse_grads[0]) : none, by_entry);
  }
};

PairResult lstm_forward_pair_autograd(const at::Tensor& input, const at::Tensor& batch_sizes,
                                      const OptionalTensors& forward_args, const OptionalTensors& reverse_args) {
  std::vector<at::Tensor> present;
  std::vector<int64_t> layout;
  for (const OptionalTensors* list : {&forward_args, &reverse_args}) {
    if (list->size() == kPairForwardArgs)  // else LstmPair::forward refuses the list
      refuse_regulariser_grads({list->get(kPairRecurrentMask), list->get(kPairRecurrentMask + 1),
                                list->get(kPairRecurrentMask + 2)});
    for (size_t i = 0; i < list->size(); ++i) {
      const std::optional<at::Tensor> t = list->get(i);
      layout.push_back(t.has_value() && t->defined() ? static_cast<int64_t>(present.size()) : -1);
      if (layout.back() >= 0) present.push_back(*t);
    }
  }
  const variable_list out = LstmPair::apply(input, batch_sizes, at::TensorList(present), layout);
  return {std::vector<at::Tensor>(out.begin(), out.begin() + kForwardOutputs),
          std::vector<at::Tensor>(out.begin() + kForwardOutputs, out.end())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnlp, Autograd, m) {
  m.impl("lstm_forward", &lstm_forward_autograd);
  m.impl("lstm_forward_pair", &lstm_forward_pair_autograd);
}

}  // namespace fastnlp
