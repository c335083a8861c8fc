// The time loop of one LSTM layer direction, forward and backward through
// time, for every device (see lstm.h). Work per step is proportional to the
// sequences still alive at that step: padding is never computed.
//
// Forward, per step t (alive rows 0..bs-1):
//   gates[t] = x_t W_ih^T + b   (all steps at once, one GEMM before the loop)
//   gates[t] += h_{t-1} W_hh^T  (one GEMM per step)
//   pointwise: activations, c_t, h~_t = o * tanh(c_t)
//   h_t = h~_t W_hr^T           (projection, one GEMM per step, if any)
// A device may run the whole forward or backward loop of a direction without
// projection or layer norm in one go instead (LstmStepKernels::
// sequence_forward and sequence_backward: CUDA, at small sizes), writing the
// same results; the backward's input and weight GEMMs follow as for a chunk.
// Backward runs the steps in the opposite order, in chunks of consecutive
// steps; every GEMM that does not feed the recursion (input and weight
// gradients) runs once per chunk, over all of the chunk's rows.
//
// Layer normalisation (LstmLayerNorm) changes three things: the input half is
// normalised per row once for all steps before the loop (its backward runs
// per chunk), both ATen ops; the recurrent product is written to its own
// buffer, which the step kernel normalises in place and adds to the gates;
// the step kernel also normalises c~_t before its tanh. The step kernels
// back-propagate through the last two.
#include "lstm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <utility>
#include <vector>

namespace fastnlp {
namespace {

bool has_tensor(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "fastnlp.lstm: ", name, " must have shape (",
              rows, ", ", cols, "), got ", t.sizes());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "fastnlp.lstm: ", name, " has dtype ", t.scalar_type(),
              " but input has dtype ", input.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "fastnlp.lstm: ", name, " is on ", t.device(), " but input is on ",
              input.device());
}

std::vector<int64_t> step_offsets(const std::vector<int64_t>& steps) {
  std::vector<int64_t> offsets(steps.size());
  int64_t offset = 0;
  for (size_t t = 0; t < steps.size(); ++t) {
    offsets[t] = offset;
    offset += steps[t];
  }
  return offsets;
}

}  // namespace

std::vector<int64_t> lstm_check_inputs(const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0,
                                       const at::Tensor& c0, const at::Tensor& weight_ih,
                                       const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
                                       const std::optional<at::Tensor>& bias_hh,
                                       const std::optional<at::Tensor>& weight_hr, c10::ScalarType weights_dtype) {
  TORCH_CHECK(input.dim() == 2, "fastnlp.lstm: input must be 2-D (rows, input_size), got ", input.sizes());
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), "fastnlp.lstm: input must be floating point, got ",
              input.scalar_type());
  TORCH_CHECK(h0.dim() == 2 && c0.dim() == 2, "fastnlp.lstm: h0 and c0 must be 2-D (batch, size), got ", h0.sizes(),
              " and ", c0.sizes());
  const int64_t N = input.size(0), B = h0.size(0);
  TORCH_CHECK(c0.size(0) == B, "fastnlp.lstm: h0 and c0 disagree on the batch size: ", h0.sizes(), " vs ",
              c0.sizes());
  // The weights define the sizes (as a module's hidden_size and proj_size
  // do), so that a state of the wrong width is the one named in the error.
  TORCH_CHECK(weight_ih.dim() == 2 && weight_ih.size(0) % 4 == 0,
              "fastnlp.lstm: weight_ih must have shape (4 * hidden_size, input_size), got ", weight_ih.sizes());
  const int64_t H = weight_ih.size(0) / 4, I = weight_ih.size(1);
  // As torch.lstm_cell, the input is the one named when the feature sizes differ.
  TORCH_CHECK(input.size(1) == I, "fastnlp.lstm: input has ", input.size(1),
              " features but weight_ih takes ", I, " (its input_size)");
  if (has_tensor(weight_hr))
    TORCH_CHECK(weight_hr->dim() == 2, "fastnlp.lstm: weight_hr must have shape (proj_size, hidden_size), got ",
                weight_hr->sizes());
  const int64_t P = has_tensor(weight_hr) ? weight_hr->size(0) : H;
  check_matrix(weight_hh, "weight_hh", 4 * H, P);
  check_matrix(h0, "h0", B, P);
  check_matrix(c0, "c0", B, H);
  check_like(h0, "h0", input);
  check_like(c0, "c0", input);
  for (const auto& [t, name] : {std::make_pair(&weight_ih, "weight_ih"), std::make_pair(&weight_hh, "weight_hh")}) {
    if (weights_dtype == c10::ScalarType::Undefined || t->scalar_type() != weights_dtype)
      check_like(*t, name, input);
    else  // the dtype the products take (see lstm_forward_impl)
      TORCH_CHECK(t->device() == input.device(), "fastnlp.lstm: ", name, " is on ", t->device(),
                  " but input is on ", input.device());
  }
  for (const auto& [t, name] : {std::make_pair(&bias_ih, "bias_ih"), std::make_pair(&bias_hh, "bias_hh")}) {
    if (!has_tensor(*t)) continue;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == 4 * H, "fastnlp.lstm: ", name, " must have shape (", 4 * H,
                "), got ", (*t)->sizes());
    check_like(**t, name, input);
  }
  if (has_tensor(weight_hr)) {
    check_matrix(*weight_hr, "weight_hr", P, H);
    check_like(*weight_hr, "weight_hr", input);
  }

  TORCH_CHECK(batch_sizes.dim() == 1 && batch_sizes.scalar_type() == at::kLong && batch_sizes.device().is_cpu(),
              "fastnlp.lstm: batch_sizes must be a 1-D int64 CPU tensor, got ", batch_sizes.scalar_type(), " ",
              batch_sizes.sizes(), " on ", batch_sizes.device());
  if (batch_sizes.numel() == 0) {  // padded input
    TORCH_CHECK((B == 0 && N == 0) || (B > 0 && N % B == 0), "fastnlp.lstm: padded input has ", N,
                " rows, not a multiple of the batch size ", B);
    return std::vector<int64_t>(B > 0 ? N / B : 0, B);
  }
  const at::Tensor sizes = batch_sizes.contiguous();
  const int64_t* bs = sizes.data_ptr<int64_t>();
  std::vector<int64_t> steps(bs, bs + sizes.numel());
  TORCH_CHECK(steps[0] == B, "fastnlp.lstm: batch_sizes[0] is ", steps[0], " but h0 has batch size ", B);
  int64_t total = 0;
  for (size_t t = 0; t < steps.size(); ++t) {
    TORCH_CHECK(steps[t] >= 1, "fastnlp.lstm: batch_sizes must be positive, got ", steps[t], " at step ", t);
    TORCH_CHECK(t == 0 || steps[t] <= steps[t - 1], "fastnlp.lstm: batch_sizes must be non-increasing, got ",
                steps[t - 1], " then ", steps[t], " at step ", t);
    total += steps[t];
  }
  TORCH_CHECK(total == N, "fastnlp.lstm: batch_sizes sum to ", total, " but input has ", N, " rows");
  return steps;
}

namespace {

at::Tensor contiguous_or_undefined(const std::optional<at::Tensor>& t) {
  return has_tensor(t) ? t->contiguous() : at::Tensor();
}

void check_regularisers(const LstmRegularisers& reg, const at::Tensor& input, int64_t N, int64_t B, int64_t H,
                        int64_t P) {
  if (has_tensor(reg.recurrent_mask)) {
    check_matrix(*reg.recurrent_mask, "recurrent_mask", B, P);
    check_like(*reg.recurrent_mask, "recurrent_mask", input);
  }
  if (has_tensor(reg.zoneout_cell)) {
    check_matrix(*reg.zoneout_cell, "zoneout_cell", N, H);
    check_like(*reg.zoneout_cell, "zoneout_cell", input);
  }
  if (has_tensor(reg.zoneout_hidden)) {
    check_matrix(*reg.zoneout_hidden, "zoneout_hidden", N, P);
    check_like(*reg.zoneout_hidden, "zoneout_hidden", input);
  }
}

// All six LN tensors or none; the gains and biases of the gate LNs are (4H),
// those of the cell LN (H). Named in the error as the Python arguments are.
void check_layer_norm(const LstmLayerNorm& ln, const at::Tensor& input, int64_t H, bool backward) {
  const std::pair<const std::optional<at::Tensor>*, const char*> all[] = {
      {&ln.ih_weight, "layer_norm_ih_weight"},     {&ln.ih_bias, "layer_norm_ih_bias"},
      {&ln.hh_weight, "layer_norm_hh_weight"},     {&ln.hh_bias, "layer_norm_hh_bias"},
      {&ln.cell_weight, "layer_norm_cell_weight"}, {&ln.cell_bias, "layer_norm_cell_bias"}};
  const bool enabled = ln.enabled();
  for (const auto& [t, name] : all) {
    // The backward pass needs neither gate LN bias.
    if (backward && (t == &ln.ih_bias || t == &ln.hh_bias)) continue;
    TORCH_CHECK(has_tensor(*t) == enabled, "fastnlp.lstm: layer normalisation needs all of its tensors, but ",
                name, enabled ? " is missing" : " is given without layer_norm_ih_weight");
    if (!enabled) continue;
    const int64_t size = (t == &ln.cell_weight || t == &ln.cell_bias) ? H : 4 * H;
    TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == size, "fastnlp.lstm: ", name, " must have shape (", size,
                "), got ", (*t)->sizes());
    check_like(**t, name, input);
  }
}

}  // namespace

std::vector<int64_t> lstm_check_forward_arguments(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& weight_hr,
    const LstmRegularisers& regularisers, const LstmLayerNorm& layer_norm, c10::ScalarType weights_dtype) {
  std::vector<int64_t> steps =
      lstm_check_inputs(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, weights_dtype);
  const int64_t H = c0.size(1);
  check_regularisers(regularisers, input, input.size(0), h0.size(0), H, h0.size(1));
  check_layer_norm(layer_norm, input, H, /*backward=*/false);
  return steps;
}

namespace {

at::ScalarType ln_stats_dtype(const at::Tensor& input) {
  return input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Runs body(c0, c1) over column blocks of [0, n) on the intra-op threads,
// each with this thread's dispatcher state (the worker threads would
// otherwise see autograd and grad mode as if at top level).
template <typename Body>
void for_column_blocks(int64_t n, int64_t threads, const Body& body) {
  // Blocks are multiples of 16 columns so that SIMD tails stay rare.
  const int64_t block = ((n + threads - 1) / threads + 15) / 16 * 16;
  const at::ThreadLocalState state;
  at::parallel_for(0, n, block, [&](int64_t c0, int64_t c1) {
    const at::ThreadLocalStateGuard guard(state);
    body(c0, c1);
  });
}

// The per-step recurrent product is split by hand between the intra-op
// threads, each taking its own block of the weight's columns, rather than
// left to the BLAS's threading. Measured on the 2-core CI machine: at B = 1
// (bi-LSTM, H = 256) the BLAS runs the near matrix-vector product on one
// thread, and splitting cut the forward by a third; at B = 64 (uni-LSTM,
// H = 512, forward+backward, interleaved medians) it beat the BLAS's own two
// threads by 11%, 684 -> 609 ms. Blocks keep at least 64 columns.
bool split_by_columns(const at::Tensor& out, int64_t n, int64_t threads) {
  return out.is_cpu() && threads > 1 && n >= 64 * threads;
}

// Whether the products round their operands (LstmStepKernels::product_dtype).
bool rounds_operands(const LstmStepKernels& kernels) {
  return kernels.product_dtype != c10::ScalarType::Undefined;
}

// t as the products take it: rounded to the kernels' product dtype where
// they have one (a copy), else t itself.
at::Tensor for_products(const LstmStepKernels& kernels, const at::Tensor& t) {
  if (!rounds_operands(kernels) || !t.defined() || t.scalar_type() == kernels.product_dtype) return t;
  return t.to(kernels.product_dtype);
}

// out = product (beta 0) or out += product (beta 1), product in out's dtype
// or in the product dtype.
void store_product(at::Tensor& out, const at::Tensor& product, double beta) {
  if (beta == 0.0)
    out.copy_(product);
  else
    out.add_(product);
}

// out = beta * out + a @ b (beta 0 or 1), a and b in out's dtype, or b (and
// a, or else a is rounded to it here) in the product dtype: then multiplied
// in that dtype and the result stored into out.
void addmm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double beta) {
  if (a.scalar_type() == out.scalar_type() && b.scalar_type() == out.scalar_type())
    out.addmm_(a, b, beta);
  else
    store_product(out, at::mm(a.to(b.scalar_type()), b), beta);
}

// out (rows, n) = beta * out + a (rows, k) @ b (k, n), b often a transposed
// weight (beta 0 or 1; with 0 whatever out held is ignored), through the
// device's few-rows product where it takes it, else addmm_. Split (see
// above), each thread takes its own block of b's columns (for a transposed
// weight, a contiguous block of the weight's rows), which then stays in that
// core's caches from one step to the next. may_split = false: never split.
void split_addmm_(const LstmStepKernels& kernels, at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                  double beta, bool may_split) {
  const auto product = [&](at::Tensor& out_block, const at::Tensor& b_block) {
    if (kernels.few_rows_addmm == nullptr || !kernels.few_rows_addmm(out_block, a, b_block, beta))
      addmm_into(out_block, a, b_block, beta);
  };
  const int64_t n = b.size(1);
  const int64_t threads = at::get_num_threads();
  if (!may_split || !split_by_columns(out, n, threads)) {
    product(out, b);
    return;
  }
  for_column_blocks(n, threads, [&](int64_t c0, int64_t c1) {
    at::Tensor out_block = out.narrow(1, c0, c1 - c0);
    product(out_block, b.narrow(1, c0, c1 - c0));
  });
}

// Whether the device's few-rows product may take a product with `rows` rows
// (its rows given unrounded where the products round their operands: it
// rounds them as it reads them, see LstmStepKernels::product_dtype).
bool few_rows(const LstmStepKernels& kernels, int64_t rows) {
  return kernels.few_rows_addmm != nullptr && rows <= kernels.few_rows_max;
}

// Preparing a right-hand matrix (LstmStepKernels::prepare_right) costs about
// as much as one product at the bench's batch sizes, so a call prepares it
// only when at least this many of its steps would use it.
constexpr int64_t kMinPreparedSteps = 4;

// The per-step product out = beta * out + a @ b (beta 0 or 1) of one call's
// time loop, b the same at every step: on the device's prepared form of b
// where it has one and the call has steps enough to pay for it (few-row
// steps excepted: the few-rows product beats it there), else split_addmm_.
// b is rounded for the products once, a at each step that is not few-row.
// Not split in a call of one step of one row (an LSTMCell step at batch 1, a
// greedy decoder's): the other thread has gone idle between calls, and
// waking it costs what its half of the product saves. Measured on the 2-core
// CI machine, a 64-step no-grad LSTMCell loop at B = 1, H = 256, against
// nn.LSTMCell (interleaved medians): 0.90-0.93x split, 0.95-0.99x not; with
// another busy process on the cores 0.43-0.45x split (27-28 ms), 0.95-1.24x
// not (12.7 ms). Loops at B = 2 and 4, and the same loops with gradients,
// measured the same either way within the noise, so they keep the split.
class StepProduct {
 public:
  StepProduct(const LstmStepKernels& kernels, const at::Tensor& b, const std::vector<int64_t>& steps)
      : kernels_(kernels), b_(for_products(kernels, b)), single_step_(steps.size() == 1) {
    if (kernels.prepare_right == nullptr) return;
    const auto uses =
        std::count_if(steps.begin(), steps.end(), [&](int64_t rows) { return !few_rows(kernels, rows); });
    if (uses >= kMinPreparedSteps) prepared_ = kernels.prepare_right(b_, steps.front());
  }

  void operator()(at::Tensor& out, const at::Tensor& a, double beta) const {
    if (few_rows(kernels_, a.size(0))) {
      split_addmm_(kernels_, out, a, b_, beta, /*may_split=*/!(single_step_ && a.size(0) == 1));
      return;
    }
    const at::Tensor a_rounded = for_products(kernels_, a);
    if (!prepared_.defined())
      split_addmm_(kernels_, out, a_rounded, b_, beta, /*may_split=*/!(single_step_ && a.size(0) == 1));
    else
      store_product(out, kernels_.prepared_matmul(a_rounded, prepared_), beta);
  }

 private:
  const LstmStepKernels& kernels_;
  const at::Tensor b_;
  const bool single_step_;
  at::Tensor prepared_;  // undefined: not prepared
};

// a @ weight^T on operands rounded for the products (see LstmStepKernels),
// in the product dtype: through the device's linear where it has one, else
// ATen's.
at::Tensor rounded_linear(const LstmStepKernels& kernels, const at::Tensor& a, const at::Tensor& weight) {
  const at::Tensor a_rounded = for_products(kernels, a), weight_rounded = for_products(kernels, weight);
  if (kernels.linear != nullptr) {
    at::Tensor product = kernels.linear(a_rounded, weight_rounded, at::Tensor());
    if (product.defined()) return product;
  }
  return at::mm(a_rounded, weight_rounded.t());
}

// Rows per block of linear's products where they round their operands.
constexpr int64_t kRoundedLinearRows = 256;

// a @ weight^T (+ bias, where defined) as a new tensor in a's dtype: through
// the device's linear where it has one (see LstmStepKernels), else ATen's.
// Where the products round their operands, the bias is added to the product
// widened back, unrounded.
at::Tensor linear(const LstmStepKernels& kernels, const at::Tensor& a, const at::Tensor& weight,
                  const at::Tensor& bias) {
  if (rounds_operands(kernels)) {
    // Block by block of rows, each block's product widened into the result
    // while it is in cache: a product over all rows would be a second
    // buffer of the result's size, new at every call, and faulting its pages
    // in costs more than the product saves. (Widened, then added: at::add of
    // a bfloat16 and a float32 tensor took 8.9 ms at (2048, 1024), the two
    // steps 0.48.)
    const at::Tensor weight_rounded = for_products(kernels, weight);
    at::Tensor result = at::empty({a.size(0), weight.size(0)}, a.options());
    for (int64_t row = 0; row < a.size(0); row += kRoundedLinearRows) {
      const int64_t rows = std::min(kRoundedLinearRows, a.size(0) - row);
      at::Tensor block = result.narrow(0, row, rows);
      block.copy_(rounded_linear(kernels, a.narrow(0, row, rows), weight_rounded));
      if (bias.defined()) block.add_(bias);
    }
    return result;
  }
  if (kernels.linear != nullptr) {
    at::Tensor product = kernels.linear(a, weight, bias);
    if (product.defined()) return product;
  }
  return bias.defined() ? at::addmm(bias, a, weight.t()) : at::mm(a, weight.t());
}

// x W_ih^T + bias_ih + bias_hh (either may be absent) for all N rows: one
// GEMM, or, for a cell step of a few rows, the device's few-rows product on
// rows that start as the biases' sum (written there by one add, not summed
// into a new tensor and copied: at one row each ATen call is a fair share
// of the step).
at::Tensor input_product(const LstmStepKernels& kernels, const at::Tensor& input, const at::Tensor& weight_ih,
                         const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh) {
  const int64_t N = input.size(0), G = weight_ih.size(0);
  const bool has_ih = has_tensor(bias_ih), has_hh = has_tensor(bias_hh);
  if (few_rows(kernels, N)) {
    at::Tensor gates = at::empty({N, G}, input.options());  // never a view of a bias: it is written
    if (has_ih && has_hh)
      at::add_out(gates, bias_ih->expand({N, G}), bias_hh->expand({N, G}));
    else if (has_ih || has_hh)
      gates.copy_((has_ih ? *bias_ih : *bias_hh).expand({N, G}));
    if (kernels.few_rows_addmm(gates, input, weight_ih.t(), has_ih || has_hh ? 1.0 : 0.0)) return gates;
  }
  at::Tensor bias;
  if (has_ih && has_hh)
    bias = *bias_ih + *bias_hh;
  else if (has_ih || has_hh)
    bias = has_ih ? *bias_ih : *bias_hh;
  return linear(kernels, input, weight_ih, bias);
}

// The backward pass walks the steps in chunks and does the work that does
// not feed the recursion (the input and weight gradients: GEMMs over the
// chunk's rows) as soon as a chunk is done, so the per-step gradients live
// only in chunk-sized buffers that are reused and are still in cache when
// those GEMMs read them. Whole-batch buffers (N rows) are large and freshly
// allocated at every call: on the 2-core CI machine faulting in a new 64 MB
// buffer alone takes about 50 ms. Measured there (uni-LSTM B=64 T=128 I=256
// H=512, forward+backward) chunks of 256 to 2048 rows all cut the step from
// 690 to 640 ms; on the CPU a chunk holds at least kCpuChunkRows rows,
// elsewhere one chunk holds every step.
constexpr int64_t kCpuChunkRows = 1024;

// Steps first_s down to last_s in the backward walk (s = T - 1 .. 0, step
// t = s, or T - 1 - s in reverse), and the rows they cover: in either
// direction consecutive steps are adjacent in the packed layout.
struct StepChunk {
  int64_t first_s, last_s, row_begin, rows;
};

std::vector<StepChunk> plan_chunks(const std::vector<int64_t>& steps, const std::vector<int64_t>& offsets,
                                   bool reverse, int64_t min_rows) {
  const int64_t T = static_cast<int64_t>(steps.size());
  std::vector<StepChunk> chunks;
  for (int64_t s = T - 1; s >= 0;) {
    StepChunk chunk{s, s, offsets[reverse ? T - 1 - s : s], 0};
    for (; s >= 0 && (chunk.rows == 0 || chunk.rows < min_rows); --s) {
      const int64_t t = reverse ? T - 1 - s : s;
      chunk.last_s = s;
      chunk.row_begin = std::min(chunk.row_begin, offsets[t]);
      chunk.rows += steps[t];
    }
    chunks.push_back(chunk);
  }
  return chunks;
}

// Rows [offset, offset + rows) of t; t itself when that is all of it (a
// cell step, or any step of one sequence), which saves a narrow's dispatch
// per tensor and step.
at::Tensor row_block(const at::Tensor& t, int64_t offset, int64_t rows) {
  return offset == 0 && rows == t.size(0) ? t : t.narrow(0, offset, rows);
}

// row_block of an optional per-row tensor.
at::Tensor step_rows(const at::Tensor& t, int64_t offset, int64_t rows) {
  return t.defined() ? row_block(t, offset, rows) : at::Tensor();
}

}  // namespace

LstmForwardResult lstm_forward_impl(
    const LstmStepKernels& kernels, const at::Tensor& input_in, const at::Tensor& batch_sizes, const at::Tensor& h0,
    const at::Tensor& c0, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& bias_ih, const std::optional<at::Tensor>& bias_hh,
    const std::optional<at::Tensor>& weight_hr, bool reverse, const LstmRegularisers& regularisers,
    const LstmLayerNorm& layer_norm) {
  const std::vector<int64_t> steps =
      lstm_check_forward_arguments(input_in, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                                   regularisers, layer_norm, kernels.product_dtype);
  const std::vector<int64_t> offsets = step_offsets(steps);
  const int64_t T = static_cast<int64_t>(steps.size()), N = input_in.size(0), B = h0.size(0);
  const int64_t H = c0.size(1), P = h0.size(1);
  const bool ln = layer_norm.enabled();
  const bool projected = has_tensor(weight_hr);
  const at::Tensor input = input_in.contiguous();
  const at::Tensor recurrent_mask = contiguous_or_undefined(regularisers.recurrent_mask);
  const at::Tensor zoneout_cell = contiguous_or_undefined(regularisers.zoneout_cell);
  const at::Tensor zoneout_hidden = contiguous_or_undefined(regularisers.zoneout_hidden);

  at::Tensor gates;  // (N, 4H): the input half of every step's pre-activations, in one GEMM
  at::Tensor norm_ih, norm_hh, ln_stats;
  if (ln) {
    // Normalised without gain and bias, which then come in with the LSTM
    // biases in one pass; the normalised product is kept for the backward.
    const at::Tensor product = linear(kernels, input, weight_ih, at::Tensor());
    auto [normalised, mean, rstd] =
        at::native_layer_norm(product, {4 * H}, std::nullopt, std::nullopt, kLstmLayerNormEps);
    (void)mean;
    norm_ih = normalised;
    // (LN_hh's bias is added by the step kernel, with its normalised product.)
    at::Tensor shift = *layer_norm.ih_bias;
    if (has_tensor(bias_ih)) shift = shift + *bias_ih;
    if (has_tensor(bias_hh)) shift = shift + *bias_hh;
    gates = at::addcmul(shift, norm_ih, *layer_norm.ih_weight);
    norm_hh = at::empty({N, 4 * H}, input.options());
    ln_stats = at::empty({N, 4}, input.options().dtype(ln_stats_dtype(input)));
    ln_stats.select(1, 0).copy_(rstd.reshape({N}));
  } else {
    gates = input_product(kernels, input, weight_ih, bias_ih, bias_hh);
  }
  if (!ln) {  // three distinct tensors: outputs of an op must not alias
    norm_ih = at::empty({0}, input.options());
    norm_hh = at::empty({0}, input.options());
    ln_stats = at::empty({0}, input.options());
  }
  at::Tensor cells = at::empty({N, H}, input.options());
  at::Tensor output = at::empty({N, P}, input.options());
  at::Tensor h_state = h0.contiguous().clone();
  at::Tensor c_state = c0.contiguous().clone();
  if (kernels.sequence_forward != nullptr && !ln && !projected &&
      kernels.sequence_forward(LstmSequenceForward{steps, offsets, reverse, gates, c_state, h_state, cells, output,
                                                   weight_hh.contiguous(), recurrent_mask, zoneout_cell,
                                                   zoneout_hidden}))
    return {output, h_state, c_state, gates, cells, norm_ih, norm_hh, ln_stats};
  at::Tensor h_tilde = projected ? at::empty({B, H}, input.options()) : at::Tensor();
  at::Tensor h_masked = recurrent_mask.defined() ? at::empty({B, P}, input.options()) : at::Tensor();
  const StepProduct recurrent_product(kernels, weight_hh.t(), steps);
  // The step kernels index them as plain arrays.
  const at::Tensor ln_hh_weight = contiguous_or_undefined(layer_norm.hh_weight);
  const at::Tensor ln_hh_bias = contiguous_or_undefined(layer_norm.hh_bias);
  const at::Tensor ln_cell_weight = contiguous_or_undefined(layer_norm.cell_weight);
  const at::Tensor ln_cell_bias = contiguous_or_undefined(layer_norm.cell_bias);

  for (int64_t s = 0; s < T; ++s) {
    const int64_t t = reverse ? T - 1 - s : s;
    const int64_t rows = steps[t], offset = offsets[t];
    at::Tensor step_gates = row_block(gates, offset, rows);
    at::Tensor h_prev = row_block(h_state, 0, rows);
    at::Tensor h_in = h_prev;
    if (recurrent_mask.defined()) {
      h_in = row_block(h_masked, 0, rows);
      at::mul_out(h_in, h_prev, row_block(recurrent_mask, 0, rows));
    }
    // Under layer norm the recurrent product is normalised on its own before
    // it joins the gates, so it gets its own rows.
    at::Tensor step_rec = ln ? row_block(norm_hh, offset, rows) : at::Tensor();
    if (ln)
      recurrent_product(step_rec, h_in, 0.0);
    else
      recurrent_product(step_gates, h_in, 1.0);
    at::Tensor step_out = row_block(output, offset, rows);
    LstmForwardStep step{step_gates,
                         row_block(c_state, 0, rows),
                         row_block(cells, offset, rows),
                         projected ? row_block(h_tilde, 0, rows) : step_out,
                         projected ? at::Tensor() : h_prev,
                         step_rows(zoneout_cell, offset, rows),
                         projected ? at::Tensor() : step_rows(zoneout_hidden, offset, rows)};
    if (ln) {
      step.norm_hh = step_rec;
      step.ln_hh_weight = ln_hh_weight;
      step.ln_hh_bias = ln_hh_bias;
      step.ln_cell_weight = ln_cell_weight;
      step.ln_cell_bias = ln_cell_bias;
      step.ln_stats = row_block(ln_stats, offset, rows);
    }
    kernels.forward(step);
    if (projected) {
      at::mm_out(step_out, step.h_out, weight_hr->t());
      if (zoneout_hidden.defined()) step_out.lerp_(h_prev, row_block(zoneout_hidden, offset, rows));
      h_prev.copy_(step_out);
    }
  }
  return {output, h_state, c_state, gates, cells, norm_ih, norm_hh, ln_stats};
}

LstmBackwardResult lstm_backward_impl(
    const LstmStepKernels& kernels, const at::Tensor& grad_output_in, const at::Tensor& grad_h_n,
    const at::Tensor& grad_c_n, const at::Tensor& input_in, const at::Tensor& batch_sizes, const at::Tensor& h0_in,
    const at::Tensor& c0_in, const at::Tensor& weight_ih, const at::Tensor& weight_hh,
    const std::optional<at::Tensor>& weight_hr, bool has_bias, bool reverse, const at::Tensor& output,
    const at::Tensor& gates, const at::Tensor& cells, const LstmRegularisers& regularisers,
    const LstmLayerNorm& layer_norm, const LstmLayerNormSaved& saved, LstmGradientsWanted wanted) {
  const std::vector<int64_t> steps = lstm_check_inputs(input_in, batch_sizes, h0_in, c0_in, weight_ih, weight_hh,
                                                       std::nullopt, std::nullopt, weight_hr, kernels.product_dtype);
  const std::vector<int64_t> offsets = step_offsets(steps);
  const int64_t T = static_cast<int64_t>(steps.size()), N = input_in.size(0), B = h0_in.size(0);
  const int64_t H = c0_in.size(1), P = h0_in.size(1);
  check_regularisers(regularisers, input_in, N, B, H, P);
  TORCH_CHECK(grad_output_in.dim() == 2 && grad_output_in.size(0) == N && grad_output_in.size(1) == P,
              "fastnlp.lstm: grad_output must have shape (", N, ", ", P, "), got ", grad_output_in.sizes());
  TORCH_CHECK(gates.sizes() == at::IntArrayRef({N, 4 * H}) && cells.sizes() == at::IntArrayRef({N, H}) &&
                  output.sizes() == at::IntArrayRef({N, P}),
              "fastnlp.lstm: saved gates/cells/output do not match the input");
  check_layer_norm(layer_norm, input_in, H, /*backward=*/true);
  const bool ln = layer_norm.enabled();
  TORCH_CHECK(has_tensor(saved.norm_ih) == ln && has_tensor(saved.norm_hh) == ln && has_tensor(saved.ln_stats) == ln,
              "fastnlp.lstm: norm_ih, norm_hh and ln_stats must be given exactly when the layer-norm weights are");
  at::Tensor norm_ih, norm_hh, ln_stats;
  if (ln) {
    norm_ih = saved.norm_ih->contiguous();
    norm_hh = saved.norm_hh->contiguous();
    ln_stats = saved.ln_stats->contiguous();
    TORCH_CHECK(norm_ih.sizes() == at::IntArrayRef({N, 4 * H}) && norm_hh.sizes() == at::IntArrayRef({N, 4 * H}) &&
                    ln_stats.sizes() == at::IntArrayRef({N, 4}),
                "fastnlp.lstm: saved norm_ih/norm_hh (", N, ", ", 4 * H, ") and ln_stats (", N,
                ", 4) do not match the input: got ", norm_ih.sizes(), ", ", norm_hh.sizes(), ", ", ln_stats.sizes());
    check_like(norm_ih, "norm_ih", input_in);
    check_like(norm_hh, "norm_hh", input_in);
    TORCH_CHECK(ln_stats.scalar_type() == ln_stats_dtype(input_in) && ln_stats.device() == input_in.device(),
                "fastnlp.lstm: ln_stats must be ", ln_stats_dtype(input_in), " on ", input_in.device(), ", got ",
                ln_stats.scalar_type(), " on ", ln_stats.device());
  }
  const bool projected = has_tensor(weight_hr);
  const auto options = input_in.options();
  // Read only for grad_weight_ih: otherwise input may be a broadcast stand-in
  // (see LstmGradientsWanted), which contiguous() would materialise.
  const at::Tensor input = wanted.weights ? input_in.contiguous() : input_in;
  // The operands of the input and weight gradients' products, rounded once
  // for all chunks where the products round them (see LstmStepKernels).
  const at::Tensor input_for_products = wanted.weights ? for_products(kernels, input) : input;
  const at::Tensor weight_ih_for_products = wanted.input ? for_products(kernels, weight_ih) : weight_ih;
  const at::Tensor h0 = h0_in.contiguous(), c0 = c0_in.contiguous();
  const at::Tensor grad_output = grad_output_in.contiguous();
  const at::Tensor recurrent_mask = contiguous_or_undefined(regularisers.recurrent_mask);
  const at::Tensor zoneout_cell = contiguous_or_undefined(regularisers.zoneout_cell);
  const at::Tensor zoneout_hidden = contiguous_or_undefined(regularisers.zoneout_hidden);

  // dL/dh_{t-1} = dL/d(pre-activations) W_hh at every step.
  const StepProduct recurrent_product(kernels, weight_hh, steps);
  // Gradients flowing back through the recurrence, per sequence; rows that
  // are not alive yet (in backward order) still hold grad_h_n / grad_c_n.
  at::Tensor dh_state = at::empty({B, P}, options);
  dh_state.copy_(grad_h_n);
  at::Tensor dc_state = at::empty({B, H}, options);
  dc_state.copy_(grad_c_n);
  // Chunk-sized buffers (see plan_chunks), refilled chunk after chunk: the
  // step rows of the chunk being walked, at their offset from its first row.
  const std::vector<StepChunk> chunks = plan_chunks(steps, offsets, reverse, input.is_cpu() ? kCpuChunkRows : N);
  int64_t capacity = 0;
  for (const StepChunk& chunk : chunks) capacity = std::max(capacity, chunk.rows);
  at::Tensor grad_gates = at::empty({capacity, 4 * H}, options);
  // h_{t-1} as the recurrent GEMM saw it, for grad_weight_hh.
  at::Tensor h_prev_rows = wanted.weights ? at::empty({capacity, P}, options) : at::Tensor();
  at::Tensor grad_h_rows, h_tilde_rows, grad_tilde;             // projection only
  if (projected) {
    grad_h_rows = at::empty({capacity, P}, options);
    h_tilde_rows = at::empty({capacity, H}, options);
    grad_tilde = at::empty({B, H}, options);
  }
  // dL/d(h_{t-1} W_hh^T) through LN_hh, the per-row terms of the cell LN's
  // gain and bias gradients, and dL/d(x W_ih^T) through LN_ih.
  at::Tensor grad_rec = ln ? at::empty({capacity, 4 * H}, options) : at::Tensor();
  at::Tensor grad_ln_cell = ln ? at::empty({capacity, 2 * H}, options) : at::Tensor();
  at::Tensor grad_product_rows = ln ? at::empty({capacity, 4 * H}, options) : at::Tensor();
  const at::Tensor ln_hh_weight = contiguous_or_undefined(layer_norm.hh_weight);
  const at::Tensor ln_cell_weight = contiguous_or_undefined(layer_norm.cell_weight);
  const at::Tensor ln_cell_bias = contiguous_or_undefined(layer_norm.cell_bias);
  const at::Tensor ln_ih_weight = contiguous_or_undefined(layer_norm.ih_weight);
  // z * dL/dh_t: what zoneout passes straight on to h_{t-1}.
  at::Tensor grad_h_zoneout = zoneout_hidden.defined() ? at::empty({B, P}, options) : at::Tensor();

  // The results: grad_input row block by row block, the rest summed over the
  // chunks (the first chunk's terms are written, not added to zeros).
  // Empty results are distinct tensors: outputs of an op must not alias.
  const auto empty = [&] { return at::empty({0}, options); };
  const int64_t I = input.size(1);
  at::Tensor grad_input = wanted.input ? at::empty({N, I}, options) : empty();
  const auto sum_of_chunks = [&](at::IntArrayRef size) {  // zeros when there is no chunk
    if (!wanted.weights) return empty();
    return N > 0 ? at::empty(size, options) : at::zeros(size, options);
  };
  // Where the products round their operands and one chunk holds every step
  // (a cell step, a short sequence), W_ih's and W_hh's gradients are that
  // chunk's products as they come, in the product dtype: the same values as
  // a float32 sum rounded back by the caller, without a float32 buffer to
  // fill and copy. In a bfloat16 LSTMCell loop (B = 32, I = H = 256, 64
  // steps, forward+backward) those copies and fresh buffers took more time
  // than the products: 96.5 -> 53-70 ms (torch's nn.LSTMCell loop 52-84).
  const bool products_are_results = rounds_operands(kernels) && chunks.size() == 1 && wanted.weights;
  at::Tensor grad_weight_ih = products_are_results ? at::Tensor() : sum_of_chunks({4 * H, I});
  at::Tensor grad_weight_hh = products_are_results ? at::Tensor() : sum_of_chunks({4 * H, P});
  at::Tensor grad_bias = has_bias || ln ? sum_of_chunks({4 * H}) : at::Tensor();
  at::Tensor grad_weight_hr = projected ? sum_of_chunks({P, H}) : empty();
  at::Tensor grad_ln_ih_weight = empty(), grad_ln_hh_weight = empty(), grad_ln_gate_bias = empty();
  at::Tensor grad_ln_cell_weight = empty(), grad_ln_cell_bias = empty();
  if (ln && wanted.weights) {
    grad_ln_ih_weight = at::zeros({4 * H}, options);
    grad_ln_hh_weight = at::zeros({4 * H}, options);
    grad_ln_cell_weight = at::zeros({H}, options);
    grad_ln_cell_bias = at::zeros({H}, options);
  }

  // The GEMMs and sums of one finished chunk, over its rows [lo, lo + n).
  bool first_chunk = true;
  const auto finish_chunk = [&](int64_t lo, int64_t n) {
    if (!wanted.input && !wanted.weights) return;  // h0 and c0 only: the time loop made theirs
    const at::Tensor g = grad_gates.narrow(0, 0, n);
    at::Tensor grad_product = g;  // dL/d(x W_ih^T)
    if (ln) {
      // rstd * (d - mean(d) - n * mean(d * n)) per row, d = gain * dL/dgates.
      const at::Tensor norm = norm_ih.narrow(0, lo, n), stats = ln_stats.narrow(0, lo, n);
      grad_product = grad_product_rows.narrow(0, 0, n);
      if (kernels.layer_norm_backward != nullptr) {
        kernels.layer_norm_backward(g, norm, stats, ln_ih_weight, grad_product);
      } else {
        const auto stats_options = options.dtype(ln_stats_dtype(input_in));
        const at::Tensor nm = norm.to(stats_options);
        const at::Tensor d = g.to(stats_options) * ln_ih_weight.to(stats_options);
        grad_product.copy_((d - d.mean(1, true) - nm * (d * nm).mean(1, true)) * stats.narrow(1, 0, 1));
      }
      if (wanted.weights) {
        grad_ln_ih_weight.add_((g * norm).sum(0));
        grad_ln_hh_weight.add_((g * norm_hh.narrow(0, lo, n)).sum(0));
        const at::Tensor cell_terms = grad_ln_cell.narrow(0, 0, n).sum(0);
        grad_ln_cell_weight.add_(cell_terms.narrow(0, 0, H));
        grad_ln_cell_bias.add_(cell_terms.narrow(0, H, H));
      }
    }
    const at::Tensor grad_product_rounded = for_products(kernels, grad_product);  // once, for two products
    if (wanted.input) {
      at::Tensor grad_input_rows = grad_input.narrow(0, lo, n);
      // Left to the BLAS's threading: split as split_addmm_ splits the
      // recurrent product, these (and the forward's input product) measured
      // 4-6% slower at the uni-LSTM and cell-loop bench shapes.
      const at::Tensor product =
          kernels.linear != nullptr ? kernels.linear(grad_product_rounded, weight_ih_for_products.t(), at::Tensor())
                                    : at::Tensor();
      if (product.defined())
        grad_input_rows.copy_(product);
      else
        addmm_into(grad_input_rows, grad_product_rounded, weight_ih_for_products, 0.0);
    }
    if (!wanted.weights) return;
    const double beta = first_chunk ? 0.0 : 1.0;  // beta = 0: whatever the buffer held is ignored
    // (ATen's, not the device's linear: oneDNN's x^T g, transposed back, measured slower
    // than MKL's g^T x at every row count alone, 1.0 against 0.18 ms at 32 rows.)
    // (Without layer norm grad_product is g, the recurrent product's gradient too.)
    const at::Tensor grad_rec_rounded = ln ? for_products(kernels, grad_rec.narrow(0, 0, n)) : grad_product_rounded;
    const at::Tensor h_prev_rounded = for_products(kernels, h_prev_rows.narrow(0, 0, n));
    if (products_are_results) {
      grad_weight_ih = at::mm(grad_product_rounded.t(), input_for_products.narrow(0, lo, n));
      grad_weight_hh = at::mm(grad_rec_rounded.t(), h_prev_rounded);
    } else {
      addmm_into(grad_weight_ih, grad_product_rounded.t(), input_for_products.narrow(0, lo, n), beta);
      addmm_into(grad_weight_hh, grad_rec_rounded.t(), h_prev_rounded, beta);
    }
    // (The projection's products keep the tensors' dtype.)
    if (projected) grad_weight_hr.addmm_(grad_h_rows.narrow(0, 0, n).t(), h_tilde_rows.narrow(0, 0, n), beta);
    if (grad_bias.defined() && first_chunk)
      at::sum_out(grad_bias, g, {0});
    else if (grad_bias.defined())
      grad_bias.add_(g.sum(0));
    first_chunk = false;
  };

  // All steps in one go where the device can (CUDA at small sizes), then the
  // GEMMs over all rows as for one chunk; otherwise step by step, by chunks.
  const bool whole_sequence =
      kernels.sequence_backward != nullptr && !ln && !projected && chunks.size() == 1 && chunks[0].rows == N &&
      kernels.sequence_backward(LstmSequenceBackward{
          steps, offsets, reverse, gates.contiguous(), cells.contiguous(), output.contiguous(), h0, c0, grad_output,
          dh_state, dc_state, grad_gates, h_prev_rows, weight_hh.contiguous(), recurrent_mask, zoneout_cell,
          zoneout_hidden, grad_h_zoneout});
  if (whole_sequence) finish_chunk(0, N);
  const std::vector<StepChunk> stepwise_chunks = whole_sequence ? std::vector<StepChunk>() : chunks;
  // The chunks' steps in one go where the device can (the CPU), else step by step.
  const bool chunk_loop = kernels.chunk_backward != nullptr && !ln && !projected;
  const auto contiguous_for_chunk_loop = [&](const at::Tensor& t) { return chunk_loop ? t.contiguous() : t; };
  const at::Tensor gates_contiguous = contiguous_for_chunk_loop(gates);
  const at::Tensor cells_contiguous = contiguous_for_chunk_loop(cells);
  const at::Tensor output_contiguous = contiguous_for_chunk_loop(output);
  const at::Tensor weight_hh_contiguous = contiguous_for_chunk_loop(weight_hh);
  for (const StepChunk& chunk : stepwise_chunks) {
    if (chunk_loop &&
        kernels.chunk_backward(LstmChunkBackward{
            steps, offsets, reverse, chunk.first_s, chunk.last_s, chunk.row_begin, gates_contiguous,
            cells_contiguous, output_contiguous, h0, c0, grad_output, dh_state, dc_state, grad_gates,
            wanted.weights ? h_prev_rows : at::Tensor(), weight_hh_contiguous, recurrent_mask, zoneout_cell,
            zoneout_hidden, grad_h_zoneout})) {
      finish_chunk(chunk.row_begin, chunk.rows);
      continue;
    }
    for (int64_t s = chunk.first_s; s >= chunk.last_s; --s) {
      const int64_t t = reverse ? T - 1 - s : s;
      const int64_t rows = steps[t], offset = offsets[t], at_row = offset - chunk.row_begin;
      const int64_t prev = previous_step(t, T, reverse);
      const int64_t rows_with_prev = prev < 0 ? 0 : std::min(rows, steps[prev]);
      const int64_t prev_offset = prev < 0 ? 0 : offsets[prev];

      if (wanted.weights) {  // for grad_weight_hh only
        at::Tensor h_prev = h_prev_rows.narrow(0, at_row, rows);
        if (rows_with_prev > 0)
          h_prev.narrow(0, 0, rows_with_prev).copy_(output.narrow(0, prev_offset, rows_with_prev));
        if (rows > rows_with_prev)
          h_prev.narrow(0, rows_with_prev, rows - rows_with_prev)
              .copy_(h0.narrow(0, rows_with_prev, rows - rows_with_prev));
        if (recurrent_mask.defined()) h_prev.mul_(recurrent_mask.narrow(0, 0, rows));
      }

      at::Tensor step_grad_gates = grad_gates.narrow(0, at_row, rows);
      at::Tensor dh = dh_state.narrow(0, 0, rows);
      at::Tensor step_zoneout_h = step_rows(zoneout_hidden, offset, rows);
      at::Tensor step_grad_h_zoneout = step_rows(grad_h_zoneout, 0, rows);
      LstmBackwardStep step{gates.narrow(0, offset, rows),
                            cells.narrow(0, prev_offset, rows_with_prev),
                            rows_with_prev,
                            c0,
                            grad_output.narrow(0, offset, rows),
                            dh,
                            dc_state.narrow(0, 0, rows),
                            step_grad_gates,
                            at::Tensor(),
                            step_rows(zoneout_cell, offset, rows),
                            step_zoneout_h,
                            step_grad_h_zoneout};
      if (projected) {
        // dL/dh_t is complete here; zoneout splits it between h_{t-1} and the
        // projection's output, and the projection's input gets the rest.
        at::Tensor step_grad_h = grad_h_rows.narrow(0, at_row, rows);
        at::add_out(step_grad_h, grad_output.narrow(0, offset, rows), dh);
        if (step_zoneout_h.defined()) {
          at::mul_out(step_grad_h_zoneout, step_grad_h, step_zoneout_h);
          step_grad_h.sub_(step_grad_h_zoneout);
        }
        at::Tensor step_grad_tilde = grad_tilde.narrow(0, 0, rows);
        at::mm_out(step_grad_tilde, step_grad_h, *weight_hr);
        step.dh_a = step_grad_tilde;
        step.dh_b = at::Tensor();
        step.h_tilde = h_tilde_rows.narrow(0, at_row, rows);
        step.zoneout_hidden = at::Tensor();
        step.grad_h_prev = at::Tensor();
      }
      if (ln) {
        step.norm_hh = norm_hh.narrow(0, offset, rows);
        step.ln_stats = ln_stats.narrow(0, offset, rows);
        step.ln_hh_weight = ln_hh_weight;
        step.ln_cell_weight = ln_cell_weight;
        step.ln_cell_bias = ln_cell_bias;
        step.grad_rec = grad_rec.narrow(0, at_row, rows);
        step.grad_ln_cell = grad_ln_cell.narrow(0, at_row, rows);
      }
      kernels.backward(step);
      recurrent_product(dh, ln ? step.grad_rec : step_grad_gates, 0.0);
      if (recurrent_mask.defined()) dh.mul_(recurrent_mask.narrow(0, 0, rows));
      if (step_grad_h_zoneout.defined()) dh.add_(step_grad_h_zoneout);
    }
    finish_chunk(chunk.row_begin, chunk.rows);
  }

  if (ln) grad_ln_gate_bias = has_bias ? grad_bias.clone() : grad_bias;
  if (!has_bias) grad_bias = empty();
  return {grad_input,     dh_state,          dc_state,          grad_weight_ih,      grad_weight_hh,     grad_bias,
          grad_weight_hr, grad_ln_ih_weight, grad_ln_hh_weight, grad_ln_gate_bias, grad_ln_cell_weight,
          grad_ln_cell_bias};
}

namespace {

std::optional<at::Tensor> entry(const LstmArgumentList& list, size_t index) { return list.get(index); }

at::Tensor required(const LstmArgumentList& list, size_t index, const char* name) {
  const std::optional<at::Tensor> t = list.get(index);
  TORCH_CHECK(t.has_value() && t->defined(), "fastnlp.lstm pair: ", name, " (entry ", index, ") is required");
  return *t;
}

// The two directions' lists, each checked to hold `size` entries.
std::array<const LstmArgumentList*, 2> direction_lists(const LstmArgumentList& forward_args,
                                                      const LstmArgumentList& reverse_args, size_t size) {
  for (const LstmArgumentList* list : {&forward_args, &reverse_args})
    TORCH_CHECK(list->size() == size, "fastnlp.lstm pair: each direction takes ", size, " tensors, got ",
                list->size());
  return {&forward_args, &reverse_args};
}

template <typename Tuple, size_t... I>
std::vector<at::Tensor> tuple_to_vector(const Tuple& t, std::index_sequence<I...>) {
  return {std::get<I>(t)...};
}

template <typename... T>
std::vector<at::Tensor> to_vector(const std::tuple<T...>& t) {
  return tuple_to_vector(t, std::index_sequence_for<T...>{});
}

}  // namespace

LstmPairResult lstm_forward_pair_impl(const LstmStepKernels& kernels, LstmRunBothDirections run_both,
                                      const at::Tensor& input, const at::Tensor& batch_sizes,
                                      const LstmArgumentList& forward_args, const LstmArgumentList& reverse_args) {
  const auto lists = direction_lists(forward_args, reverse_args, 16);
  LstmDirectionResults results = run_both([&](int64_t d) {
    const LstmArgumentList& a = *lists[d];
    return to_vector(lstm_forward_impl(
        kernels, input, batch_sizes, required(a, 0, "h0"), required(a, 1, "c0"), required(a, 2, "weight_ih"),
        required(a, 3, "weight_hh"), entry(a, 4), entry(a, 5), entry(a, 6), d == 1,
        LstmRegularisers{entry(a, 7), entry(a, 8), entry(a, 9)},
        LstmLayerNorm{entry(a, 10), entry(a, 11), entry(a, 12), entry(a, 13), entry(a, 14), entry(a, 15)}));
  });
  return {std::move(results[0]), std::move(results[1])};
}

LstmPairResult lstm_backward_pair_impl(const LstmStepKernels& kernels, LstmRunBothDirections run_both,
                                       const at::Tensor& input, const at::Tensor& batch_sizes, bool has_bias,
                                       const LstmArgumentList& forward_args, const LstmArgumentList& reverse_args,
                                       LstmGradientsWanted wanted) {
  const auto lists = direction_lists(forward_args, reverse_args, 21);
  LstmDirectionResults results = run_both([&](int64_t d) {
    const LstmArgumentList& a = *lists[d];
    return to_vector(lstm_backward_impl(
        kernels, required(a, 0, "grad_output"), required(a, 1, "grad_h_n"), required(a, 2, "grad_c_n"), input,
        batch_sizes, required(a, 3, "h0"), required(a, 4, "c0"), required(a, 5, "weight_ih"),
        required(a, 6, "weight_hh"), entry(a, 7), has_bias, d == 1, required(a, 8, "output"),
        required(a, 9, "gates"), required(a, 10, "cells"), LstmRegularisers{entry(a, 11), entry(a, 12), entry(a, 13)},
        LstmLayerNorm{entry(a, 14), std::nullopt, entry(a, 15), std::nullopt, entry(a, 16), entry(a, 17)},
        LstmLayerNormSaved{entry(a, 18), entry(a, 19), entry(a, 20)}, wanted));
  });
  return {std::move(results[0]), std::move(results[1])};
}

}  // namespace fastnlp
