// The one place where every fastnlp op's schema is declared. Kernels register
// their implementations beside themselves (csrc/cpu/*.cpp, csrc/cuda/*_binding.cpp);
// fake kernels and autograd are registered from Python (fastnlp/ops/).
#include <torch/extension.h>

#include <cstdlib>

#include "cpu/few_rows_matmul.h"
#include "cpu/gate_panels.h"
#include "fastnlp_build_stamp.h"
#include "lstm.h"

TORCH_LIBRARY(fastnlp, m) {
  // Linear-chain CRF, batch first. emissions (B, T, K) float32/float64;
  // mask (B, T) bool selects the positions that form each chain (they need
  // not be a prefix); tags (B, T) int64 pins a selected position to a tag,
  // -1 leaves it free. With tags the log-partition is the gold-path score
  // (partially labelled: the log-sum over the consistent paths).
  // alpha (B, T, K) are the forward log-scores, -inf where not reachable or
  // not selected; they are saved for the backward pass.
  m.def(
      "crf_log_partition(Tensor emissions, Tensor mask, Tensor? tags, "
      "Tensor start_transitions, Tensor end_transitions, Tensor transitions) "
      "-> (Tensor log_partition, Tensor alpha)");
  // Gradients of sum_b grad_log_partition[b] * log_partition[b]: the posterior
  // marginals, computed with the backward algorithm in one pass.
  m.def(
      "crf_log_partition_backward(Tensor grad_log_partition, Tensor emissions, "
      "Tensor mask, Tensor? tags, Tensor start_transitions, Tensor end_transitions, "
      "Tensor transitions, Tensor alpha, Tensor log_partition) "
      "-> (Tensor grad_emissions, Tensor grad_start_transitions, "
      "Tensor grad_end_transitions, Tensor grad_transitions)");
  // log p(tags | emissions) per sequence (B,): the gold-path score minus log Z
  // in one pass. tags (B, T) int64 holds a tag in [0, K) or ignore_index
  // (unknown: marginalised out of the gold score) at every selected position;
  // anything else there is an error. alpha and exact (B,) bool are saved for
  // the backward pass: alpha is what the backward needs of the forward pass
  // -- on the CPU (B, 2, T, K) in the emissions' dtype, the scaled forward
  // variables and the emission weights; empty float64 on CUDA -- and exact
  // marks the sequences the backward pass recomputes from scratch (all of
  // them on CUDA).
  m.def(
      "crf_log_likelihood(Tensor emissions, Tensor mask, Tensor tags, Tensor start_transitions, "
      "Tensor end_transitions, Tensor transitions, int ignore_index) "
      "-> (Tensor log_likelihood, Tensor alpha, Tensor exact)");
  // Gradients of sum_b grad_log_likelihood[b] * log_likelihood[b]: gold-path
  // indicators (or pinned marginals) minus the posterior marginals, one pass.
  m.def(
      "crf_log_likelihood_backward(Tensor grad_log_likelihood, Tensor emissions, Tensor mask, "
      "Tensor tags, Tensor start_transitions, Tensor end_transitions, Tensor transitions, "
      "int ignore_index, Tensor alpha, Tensor exact) "
      "-> (Tensor grad_emissions, Tensor grad_start_transitions, "
      "Tensor grad_end_transitions, Tensor grad_transitions)");
  // Best path (B, T) int64, -1 at unselected positions, and its score (B,).
  m.def(
      "crf_viterbi(Tensor emissions, Tensor mask, Tensor start_transitions, "
      "Tensor end_transitions, Tensor transitions) -> (Tensor paths, Tensor scores)");
  // The k best paths (B, T, k) and scores (B, k), best first.
  m.def(
      "crf_viterbi_topk(Tensor emissions, Tensor mask, Tensor start_transitions, "
      "Tensor end_transitions, Tensor transitions, int k) -> (Tensor paths, Tensor scores)");

  // One LSTM layer in one direction over a time-major packed batch (see
  // csrc/lstm.h): input (N, I) rows, step t holding the batch_sizes[t]
  // sequences still alive (an empty batch_sizes: padded input, every one of
  // the B = h0.size(0) sequences N / B steps long); h0 (B, P), c0 (B, H);
  // weight_hr (P, H) is the projection, absent when P == H. reverse runs the
  // steps from last to first. gates (N, 4H) (activations i, f, g, o) and
  // cells (N, H) are saved for the backward pass. The regularisers are
  // optional: recurrent_mask (B, P) multiplies h_{t-1} on its way into the
  // recurrent GEMM; zoneout_cell (N, H) / zoneout_hidden (N, P) are per-unit
  // weights z of the previous state: state_t = z * state_{t-1} + (1 - z) * new.
  // Layer normalisation (all six layer_norm_* or none; gains and biases (4H)
  // for ih/hh, (H) for cell): gates = LN_ih(x W_ih^T) + LN_hh(h W_hh^T) +
  // bias_ih + bias_hh, h~ = o * tanh(LN_cell(c~)). Saved for the backward pass:
  // norm_ih, norm_hh (N, 4H) the normalised (pre-gain) products and ln_stats
  // (N, 4) = [rstd_ih, rstd_hh, mean_cell, rstd_cell] (float32; float64 for
  // float64 input); all three empty without layer_norm.
  m.def(
      "lstm_forward(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, bool reverse, "
      "Tensor? recurrent_mask=None, Tensor? zoneout_cell=None, Tensor? zoneout_hidden=None, "
      "Tensor? layer_norm_ih_weight=None, Tensor? layer_norm_ih_bias=None, Tensor? layer_norm_hh_weight=None, "
      "Tensor? layer_norm_hh_bias=None, Tensor? layer_norm_cell_weight=None, Tensor? layer_norm_cell_bias=None) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells, Tensor norm_ih, Tensor norm_hh, "
      "Tensor ln_stats)");
  // Backward through time. grad_bias is the gradient of bias_ih and of
  // bias_hh alike (empty when has_bias is false); grad_weight_hr is empty
  // without a projection. With layer_norm (its gains and cell bias, and what
  // forward saved), grad_layer_norm_gate_bias is the gradient of the ih and hh
  // LN biases alike; the LN gradients are empty without layer_norm.
  // input_grad=False leaves grad_input empty, weight_grads=False every
  // gradient after grad_c0, and both skip the products that make them (an
  // input that needs no gradient, a frozen layer).
  m.def(
      "lstm_backward(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor input, "
      "Tensor batch_sizes, Tensor h0, Tensor c0, Tensor weight_ih, Tensor weight_hh, "
      "Tensor? weight_hr, bool has_bias, bool reverse, Tensor output, Tensor gates, Tensor cells, "
      "Tensor? recurrent_mask=None, Tensor? zoneout_cell=None, Tensor? zoneout_hidden=None, "
      "Tensor? layer_norm_ih_weight=None, Tensor? layer_norm_hh_weight=None, Tensor? layer_norm_cell_weight=None, "
      "Tensor? layer_norm_cell_bias=None, Tensor? norm_ih=None, Tensor? norm_hh=None, Tensor? ln_stats=None, "
      "bool input_grad=True, bool weight_grads=True) "
      "-> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_weight_ih, "
      "Tensor grad_weight_hh, Tensor grad_bias, Tensor grad_weight_hr, Tensor grad_layer_norm_ih_weight, "
      "Tensor grad_layer_norm_hh_weight, Tensor grad_layer_norm_gate_bias, Tensor grad_layer_norm_cell_weight, "
      "Tensor grad_layer_norm_cell_bias)");
  // Both directions of one bidirectional layer at once: the same computation
  // as lstm_forward / lstm_backward run for each, but concurrently (on the
  // CPU each direction on its own thread, which uses two cores better than
  // splitting every small per-step product between them; on CUDA each on its
  // own stream, so that one direction's small kernels run beside the other's
  // on an otherwise idle GPU). Each list holds one
  // direction's tensors in lstm_forward's order after `reverse`, starting at
  // h0: [h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
  // recurrent_mask, zoneout_cell, zoneout_hidden, layer_norm_ih_weight,
  // layer_norm_ih_bias, layer_norm_hh_weight, layer_norm_hh_bias,
  // layer_norm_cell_weight, layer_norm_cell_bias]; each result list holds
  // lstm_forward's eight outputs for that direction.
  m.def(
      "lstm_forward_pair(Tensor input, Tensor batch_sizes, Tensor?[] forward_args, Tensor?[] reverse_args) "
      "-> (Tensor[] forward_outputs, Tensor[] reverse_outputs)");
  // The lists hold lstm_backward's arguments for one direction, from
  // grad_output to ln_stats, without input, batch_sizes, has_bias and reverse
  // (21 entries; see lstm_backward); the results are lstm_backward's twelve.
  // input_grad and weight_grads as there, for both directions.
  m.def(
      "lstm_backward_pair(Tensor input, Tensor batch_sizes, bool has_bias, Tensor?[] forward_args, "
      "Tensor?[] reverse_args, bool input_grad=True, bool weight_grads=True) "
      "-> (Tensor[] forward_grads, Tensor[] reverse_grads)");

  // Fused scaled-dot-product attention, flash style: the (Lq, Lk) score matrix
  // is never stored. query (B, H, Lq, D), key (B, Hk, Lk, D), value
  // (B, Hk, Lk, Dv) with H % Hk == 0 (head h reads kv-head h / (H / Hk)).
  // attn_mask: bool (True = take part) or additive float, already expanded
  // (stride 0 where broadcast) to (B, H, Lq, Lk). key_padding_mask: bool
  // (B, Lk), True = real key. is_causal: query i sees keys j <= i.
  // rng_state: int64 (2,) on the CPU, (seed, offset) of the counter-based
  // dropout; a tensor rather than two ints so that drawing it from torch's
  // generator stays inside a torch.compile graph. None when dropout_p == 0.
  // lse (B, H, Lq): log-sum-exp of each row of scaled, masked scores (float32;
  // float64 for float64 inputs), -inf for a row with no visible key (its
  // output is 0). Saved for the backward pass.
  m.def(
      "attention_forward(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
      "Tensor? key_padding_mask, bool is_causal, float dropout_p, float scale, Tensor? rng_state) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "attention_backward(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, "
      "Tensor lse, Tensor? attn_mask, Tensor? key_padding_mask, bool is_causal, float dropout_p, "
      "float scale, Tensor? rng_state) -> (Tensor grad_query, Tensor grad_key, Tensor grad_value)");
  // The dense keep-mask (B, H, Lq, Lk) bool that the kernels draw for these
  // shapes and rng_state: for testing dropout against the reference.
  m.def("attention_dropout_mask(Tensor query, Tensor key, float dropout_p, Tensor rng_state) -> Tensor");

  // The backward passes that autograd records (create_graph=True; see
  // csrc/double_backward.h), of the ops whose autograd is in C++. Each takes
  // its op's arguments and the incoming gradients of the op's differentiable
  // outputs (None where none came) and returns one gradient per argument
  // (None for non-tensors and for what needs none), differentiable: the op's
  // pure-PyTorch reference, recomputed and differentiated. Implemented in
  // Python: fastnlp/ops/crf.py and lstm.py register them through
  // fastnlp/ops/_double_backward.py.
  m.def(
      "crf_log_partition_reference_backward(Tensor emissions, Tensor mask, Tensor? tags, "
      "Tensor start_transitions, Tensor end_transitions, Tensor transitions, Tensor?[] grad_outputs) "
      "-> Tensor?[]");
  m.def(
      "crf_log_likelihood_reference_backward(Tensor emissions, Tensor mask, Tensor tags, "
      "Tensor start_transitions, Tensor end_transitions, Tensor transitions, int ignore_index, "
      "Tensor?[] grad_outputs) -> Tensor?[]");
  m.def(
      "lstm_forward_reference_backward(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor weight_ih, "
      "Tensor weight_hh, Tensor? bias_ih, Tensor? bias_hh, Tensor? weight_hr, bool reverse, "
      "Tensor? recurrent_mask, Tensor? zoneout_cell, Tensor? zoneout_hidden, "
      "Tensor? layer_norm_ih_weight, Tensor? layer_norm_ih_bias, Tensor? layer_norm_hh_weight, "
      "Tensor? layer_norm_hh_bias, Tensor? layer_norm_cell_weight, Tensor? layer_norm_cell_bias, "
      "Tensor?[] grad_outputs) -> Tensor?[]");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["source_hash"] = FASTNLP_SOURCE_HASH;
  info["torch_version"] = FASTNLP_TORCH_VERSION;
#ifdef FASTNLP_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cpu"] = true;
  return info;
}

// FASTNLP_BACKEND as the C environment holds it, None when unset. Python's
// os.environ writes through to it (putenv / unsetenv), and reading it here
// costs a fraction of os.environ.get, which raises and catches KeyError twice
// for an unset variable: ~10 us per call in a batch-1 LSTMCell step loop.
py::object backend_from_environment() {
  const char* value = std::getenv("FASTNLP_BACKEND");
  if (value == nullptr) {
    return py::none();
  }
  // Decoded as os.environ decodes (the file-system encoding, undecodable
  // bytes escaped), so a bad value reaches use_reference's error, not a
  // UnicodeDecodeError from here.
  PyObject* decoded = PyUnicode_DecodeFSDefault(value);
  if (decoded == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::object>(decoded);
}

using OptionalTensor = std::optional<at::Tensor>;

// fastnlp::lstm_forward's argument checks, without running it: the reference
// backend (fastnlp.ops.lstm_layer) calls this first, so that both backends
// refuse the same malformed input with the same message. Raised as the op
// raises it (RuntimeError), without the C++ backtrace.
void lstm_check_arguments(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                          const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
                          const OptionalTensor& bias_ih, const OptionalTensor& bias_hh,
                          const OptionalTensor& weight_hr, const OptionalTensor& recurrent_mask,
                          const OptionalTensor& zoneout_cell, const OptionalTensor& zoneout_hidden,
                          const OptionalTensor& layer_norm_ih_weight, const OptionalTensor& layer_norm_ih_bias,
                          const OptionalTensor& layer_norm_hh_weight, const OptionalTensor& layer_norm_hh_bias,
                          const OptionalTensor& layer_norm_cell_weight, const OptionalTensor& layer_norm_cell_bias) {
  try {
    fastnlp::lstm_check_forward_arguments(
        input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
        {recurrent_mask, zoneout_cell, zoneout_hidden},
        {layer_norm_ih_weight, layer_norm_ih_bias, layer_norm_hh_weight, layer_norm_hh_bias, layer_norm_cell_weight,
         layer_norm_cell_bias});
  } catch (const c10::Error& e) {
    throw std::runtime_error(e.what_without_backtrace());
  }
}

// fastnlp::few_rows_addmm_with on tensors from Python, for the tests: out
// is written in place; returns whether the few-rows loops took the product.
bool few_rows_addmm_for_tests(at::Tensor out, const at::Tensor& a, const at::Tensor& b, double beta,
                              bool allow_avx512) {
  return fastnlp::few_rows_addmm_with(out, a, b, beta, allow_avx512);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastnlp compiled kernels; the ops live under torch.ops.fastnlp";
  m.def("build_info", &build_info, "Which backends this build holds and what it was built from");
  m.def("backend_from_environment", &backend_from_environment,
        "FASTNLP_BACKEND from the process environment, or None when it is unset");
  m.def("lstm_check_arguments", &lstm_check_arguments,
        "fastnlp::lstm_forward's argument checks alone (for the reference backend)");
  m.def("few_rows_addmm_", &few_rows_addmm_for_tests,
        "out = beta * out + a @ b through the CPU's few-rows product loops, in place; False where they do not "
        "take it (for the tests)",
        py::arg("out"), py::arg("a"), py::arg("b"), py::arg("beta"), py::arg("allow_avx512") = true);
  m.def("cpu_has_avx512", &fastnlp::cpu_has_avx512,
        "Whether this CPU runs the AVX-512 loops of the few-rows products (float32 weights)");
  m.def("allow_gate_panels", &fastnlp::allow_gate_panels,
        "Whether the CPU LSTM may run its whole-sequence forward loop on gate panels (False: its step loop); "
        "returns the previous setting (for the tests)",
        py::arg("allowed"));
  m.def("cpu_has_bfloat16_dot", &fastnlp::cpu_has_bfloat16_dot,
        "Whether this CPU runs the AVX-512 bfloat16 dot-product loop of the few-rows products");
}
