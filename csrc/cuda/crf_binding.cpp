// CUDA implementations of the fastnlp CRF ops (schemas in csrc/ops.cpp): checks
// and allocation here, the kernels in crf.cu behind the torch-free crf.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "crf.h"
#include "torch_cuda.h"

namespace fastnlp {
namespace {

namespace kern = ::fastnlp::cuda_impl;

void check_same_device(const at::Tensor& t, const at::Tensor& emissions, const char* name) {
  TORCH_CHECK(t.device() == emissions.device(), "crf: ", name, " is on ", t.device(),
              " but emissions is on ", emissions.device());
}

void check_param(const at::Tensor& t, const at::Tensor& emissions, at::IntArrayRef shape,
                 const char* name) {
  check_same_device(t, emissions, name);
  TORCH_CHECK(t.scalar_type() == emissions.scalar_type(), "crf: ", name, " must have dtype ",
              emissions.scalar_type(), " (the dtype of emissions), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "crf: ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

struct Sizes {
  int64_t B, T, K;
};

// Checks shared by every op.
Sizes check_inputs(const at::Tensor& emissions,
                   const at::Tensor& mask, const at::Tensor& start_transitions,
                   const at::Tensor& end_transitions, const at::Tensor& transitions) {
  TORCH_CHECK(is_cuda_tensor(emissions), "crf: emissions must be a CUDA tensor");
  TORCH_CHECK(emissions.dim() == 3, "crf: emissions must be (B, T, K), got shape ",
              emissions.sizes());
  TORCH_CHECK(emissions.scalar_type() == at::kFloat || emissions.scalar_type() == at::kDouble,
              "crf: emissions must be float32 or float64, got ", emissions.scalar_type());
  const int64_t B = emissions.size(0);
  const int64_t T = emissions.size(1);
  const int64_t K = emissions.size(2);
  TORCH_CHECK(K >= 1, "crf: the number of tags K must be at least 1");
  TORCH_CHECK(K <= std::numeric_limits<int32_t>::max(), "crf: too many tags (", K, ")");
  TORCH_CHECK(B <= std::numeric_limits<int32_t>::max(), "crf: batch too large (", B, ")");
  check_same_device(mask, emissions, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "crf: mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T,
              "crf: mask must have shape (B, T) = (", B, ", ", T, "), got ", mask.sizes());
  check_param(start_transitions, emissions, {K}, "start_transitions");
  check_param(end_transitions, emissions, {K}, "end_transitions");
  check_param(transitions, emissions, {K, K}, "transitions");
  return {B, T, K};
}

// Returns the contiguous tags, or an undefined tensor when there are none.
at::Tensor check_tags(const std::optional<at::Tensor>& tags, const at::Tensor& emissions,
                      int64_t B, int64_t T) {
  if (!tags.has_value() || !tags->defined()) return at::Tensor();
  const at::Tensor& t = *tags;
  check_same_device(t, emissions, "tags");
  TORCH_CHECK(t.scalar_type() == at::kLong, "crf: tags must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == B && t.size(1) == T,
              "crf: tags must have shape (B, T) = (", B, ", ", T, "), got ", t.sizes());
  return t.contiguous();
}

const int64_t* tags_ptr(const at::Tensor& tags) {
  return tags.defined() ? tags.data_ptr<int64_t>() : nullptr;
}

// A byte buffer on the device of `like`; undefined when no scratch is needed.
at::Tensor workspace(int64_t bytes, const at::Tensor& like) {
  if (bytes <= 0) return at::Tensor();
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

void* workspace_ptr(const at::Tensor& ws) { return ws.defined() ? ws.data_ptr() : nullptr; }

std::tuple<at::Tensor, at::Tensor> crf_log_partition_cuda(
    const at::Tensor& emissions, const at::Tensor& mask, const std::optional<at::Tensor>& tags,
    const at::Tensor& start_transitions, const at::Tensor& end_transitions,
    const at::Tensor& transitions) {
  const Sizes sz = check_inputs(emissions, mask, start_transitions, end_transitions, transitions);
  const int64_t B = sz.B, T = sz.T, K = sz.K;
  const c10::cuda::OptionalCUDAGuard guard(emissions.device());
  const at::Tensor tags_c = check_tags(tags, emissions, B, T);

  at::Tensor log_partition = at::empty({B}, emissions.options());
  at::Tensor alpha = at::empty({B, T, K}, emissions.options());
  if (B == 0) return {log_partition, alpha};

  const at::Tensor em = emissions.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  const at::Tensor start = start_transitions.contiguous();
  const at::Tensor end = end_transitions.contiguous();
  const at::Tensor trans = transitions.contiguous();
  const at::Tensor ws = workspace(
      kern::crf_log_partition_workspace_bytes(B, K, em.element_size()), em);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(em.scalar_type(), "crf_log_partition_cuda", [&] {
    C10_CUDA_CHECK(kern::crf_log_partition(
        em.data_ptr<scalar_t>(), mask_c.data_ptr<bool>(), tags_ptr(tags_c),
        start.data_ptr<scalar_t>(), end.data_ptr<scalar_t>(), trans.data_ptr<scalar_t>(), B, T,
        K, log_partition.data_ptr<scalar_t>(), alpha.data_ptr<scalar_t>(), workspace_ptr(ws),
        stream));
  });
  return {log_partition, alpha};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_log_partition_backward_cuda(
    const at::Tensor& grad_log_partition, const at::Tensor& emissions, const at::Tensor& mask,
    const std::optional<at::Tensor>& tags, const at::Tensor& start_transitions,
    const at::Tensor& end_transitions, const at::Tensor& transitions, const at::Tensor& alpha,
    const at::Tensor& log_partition) {
  const Sizes sz = check_inputs(emissions, mask, start_transitions, end_transitions, transitions);
  const int64_t B = sz.B, T = sz.T, K = sz.K;
  const c10::cuda::OptionalCUDAGuard guard(emissions.device());
  const at::Tensor tags_c = check_tags(tags, emissions, B, T);
  check_param(grad_log_partition, emissions, {B}, "grad_log_partition");
  check_param(alpha, emissions, {B, T, K}, "alpha");
  check_param(log_partition, emissions, {B}, "log_partition");

  at::Tensor grad_emissions = at::empty({B, T, K}, emissions.options());
  if (B == 0) {
    // No sequence: every gradient is zero. (T == 0 goes to the kernel, which
    // still makes an invalid parameter's gradient NaN.)
    grad_emissions.zero_();
    return {grad_emissions, at::zeros({K}, emissions.options()),
            at::zeros({K}, emissions.options()), at::zeros({K, K}, emissions.options())};
  }

  const at::Tensor grad = grad_log_partition.contiguous();
  const at::Tensor em = emissions.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  const at::Tensor end = end_transitions.contiguous();
  const at::Tensor trans = transitions.contiguous();
  const at::Tensor alpha_c = alpha.contiguous();
  const at::Tensor log_z = log_partition.contiguous();
  // Per-sequence partials, reduced over the batch below, so the result does
  // not depend on the order of atomic additions.
  at::Tensor grad_start_seq = at::empty({B, K}, emissions.options());
  at::Tensor grad_end_seq = at::empty({B, K}, emissions.options());
  at::Tensor grad_trans_seq = at::empty({B, K, K}, emissions.options());
  const at::Tensor ws = workspace(
      kern::crf_log_partition_backward_workspace_bytes(B, K, em.element_size()), em);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(em.scalar_type(), "crf_log_partition_backward_cuda", [&] {
    C10_CUDA_CHECK(kern::crf_log_partition_backward(
        grad.data_ptr<scalar_t>(), em.data_ptr<scalar_t>(), mask_c.data_ptr<bool>(),
        tags_ptr(tags_c), end.data_ptr<scalar_t>(), trans.data_ptr<scalar_t>(),
        alpha_c.data_ptr<scalar_t>(), log_z.data_ptr<scalar_t>(), B, T, K,
        grad_emissions.data_ptr<scalar_t>(), grad_start_seq.data_ptr<scalar_t>(),
        grad_end_seq.data_ptr<scalar_t>(), grad_trans_seq.data_ptr<scalar_t>(),
        workspace_ptr(ws), stream));
  });
  return {grad_emissions, grad_start_seq.sum(0), grad_end_seq.sum(0), grad_trans_seq.sum(0)};
}

std::tuple<at::Tensor, at::Tensor> crf_viterbi_cuda(const at::Tensor& emissions,
                                                    const at::Tensor& mask,
                                                    const at::Tensor& start_transitions,
                                                    const at::Tensor& end_transitions,
                                                    const at::Tensor& transitions) {
  const Sizes sz = check_inputs(emissions, mask, start_transitions, end_transitions, transitions);
  const int64_t B = sz.B, T = sz.T, K = sz.K;
  const c10::cuda::OptionalCUDAGuard guard(emissions.device());

  at::Tensor paths = at::empty({B, T}, emissions.options().dtype(at::kLong));
  at::Tensor scores = at::empty({B}, emissions.options());
  if (B == 0) return {paths, scores};

  const at::Tensor em = emissions.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  const at::Tensor start = start_transitions.contiguous();
  const at::Tensor end = end_transitions.contiguous();
  const at::Tensor trans = transitions.contiguous();
  // Holds the int32 backpointers (B, T, K) the on-device backtrace reads.
  const at::Tensor ws =
      workspace(kern::crf_viterbi_workspace_bytes(B, T, K, em.element_size()), em);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(em.scalar_type(), "crf_viterbi_cuda", [&] {
    C10_CUDA_CHECK(kern::crf_viterbi(
        em.data_ptr<scalar_t>(), mask_c.data_ptr<bool>(), start.data_ptr<scalar_t>(),
        end.data_ptr<scalar_t>(), trans.data_ptr<scalar_t>(), B, T, K,
        paths.data_ptr<int64_t>(), scores.data_ptr<scalar_t>(), workspace_ptr(ws), stream));
  });
  return {paths, scores};
}

std::tuple<at::Tensor, at::Tensor> crf_viterbi_topk_cuda(const at::Tensor& emissions,
                                                         const at::Tensor& mask,
                                                         const at::Tensor& start_transitions,
                                                         const at::Tensor& end_transitions,
                                                         const at::Tensor& transitions,
                                                         int64_t k) {
  const Sizes sz = check_inputs(emissions, mask, start_transitions, end_transitions, transitions);
  const int64_t B = sz.B, T = sz.T, K = sz.K;
  TORCH_CHECK(k >= 1, "crf_viterbi_topk: k must be at least 1, got ", k);
  TORCH_CHECK(K * k <= std::numeric_limits<int32_t>::max(),
              "crf_viterbi_topk: K * k must be below 2^31, got K = ", K, ", k = ", k);
  const c10::cuda::OptionalCUDAGuard guard(emissions.device());

  at::Tensor paths = at::empty({B, T, k}, emissions.options().dtype(at::kLong));
  at::Tensor scores = at::empty({B, k}, emissions.options());
  if (B == 0) return {paths, scores};

  const at::Tensor em = emissions.contiguous();
  const at::Tensor mask_c = mask.contiguous();
  const at::Tensor start = start_transitions.contiguous();
  const at::Tensor end = end_transitions.contiguous();
  const at::Tensor trans = transitions.contiguous();
  // Holds the int32 backpointers (B, T, K, k), the final (state, rank) of
  // each output rank, and the k-best score lists when they exceed shared memory.
  const at::Tensor ws =
      workspace(kern::crf_viterbi_topk_workspace_bytes(B, T, K, k, em.element_size()), em);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES(em.scalar_type(), "crf_viterbi_topk_cuda", [&] {
    C10_CUDA_CHECK(kern::crf_viterbi_topk(
        em.data_ptr<scalar_t>(), mask_c.data_ptr<bool>(), start.data_ptr<scalar_t>(),
        end.data_ptr<scalar_t>(), trans.data_ptr<scalar_t>(), B, T, K, k,
        paths.data_ptr<int64_t>(), scores.data_ptr<scalar_t>(), workspace_ptr(ws), stream));
  });
  return {paths, scores};
}

// crf_log_likelihood on CUDA: a composite of the two log-partition kernels
// (gold chain with tags pinned, free chain), not a fused kernel. It saves
// nothing of the forward pass: alpha is empty and every sequence is marked
// exact, and the backward pass runs both forward kernels again before their
// backward kernels.
at::Tensor pinned_tags(const at::Tensor& tags, const at::Tensor& mask, const at::Tensor& emissions,
                       int64_t ignore_index) {
  TORCH_CHECK(tags.scalar_type() == at::kLong, "crf: tags must be int64, got ", tags.scalar_type());
  TORCH_CHECK(tags.sizes() == mask.sizes(), "crf: tags must be shaped like mask ", mask.sizes(), ", got ",
              tags.sizes());
  check_same_device(tags, emissions, "tags");
  // Unknown and unselected positions are free (-1). A tag still out of range
  // excludes every state in the kernel (no read out of bounds): that
  // sequence's gold score is -inf. fastnlp.ops checks the range beforehand.
  return at::where(mask.logical_and(tags.ne(ignore_index)), tags, at::scalar_tensor(-1, tags.options()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> crf_log_likelihood_cuda(
    const at::Tensor& emissions, const at::Tensor& mask, const at::Tensor& tags,
    const at::Tensor& start_transitions, const at::Tensor& end_transitions,
    const at::Tensor& transitions, int64_t ignore_index) {
  const Sizes sz = check_inputs(emissions, mask, start_transitions, end_transitions, transitions);
  const c10::cuda::OptionalCUDAGuard guard(emissions.device());
  const at::Tensor pinned = pinned_tags(tags, mask, emissions, ignore_index);
  const at::Tensor gold = std::get<0>(crf_log_partition_cuda(
      emissions, mask, pinned, start_transitions, end_transitions, transitions));
  const at::Tensor log_z = std::get<0>(crf_log_partition_cuda(
      emissions, mask, std::nullopt, start_transitions, end_transitions, transitions));
  at::Tensor alpha = at::empty({0}, emissions.options().dtype(at::kDouble));
  at::Tensor exact = at::ones({sz.B}, emissions.options().dtype(at::kBool));
  return {gold - log_z, alpha, exact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_log_likelihood_backward_cuda(
    const at::Tensor& grad_log_likelihood, const at::Tensor& emissions, const at::Tensor& mask,
    const at::Tensor& tags, const at::Tensor& start_transitions, const at::Tensor& end_transitions,
    const at::Tensor& transitions, int64_t ignore_index, const at::Tensor& alpha,
    const at::Tensor& exact) {
  check_inputs(emissions, mask, start_transitions, end_transitions, transitions);
  const c10::cuda::OptionalCUDAGuard guard(emissions.device());
  check_same_device(alpha, emissions, "alpha");
  check_same_device(exact, emissions, "exact");
  check_same_device(grad_log_likelihood, emissions, "grad_log_likelihood");
  const at::Tensor grad = grad_log_likelihood.to(emissions.scalar_type());
  const at::Tensor pinned = pinned_tags(tags, mask, emissions, ignore_index);
  // d llh = d gold - d log Z: the gold chain's gradients with grad, the free
  // chain's with -grad.
  const auto [gold, gold_alpha] = crf_log_partition_cuda(
      emissions, mask, pinned, start_transitions, end_transitions, transitions);
  const auto [log_z, free_alpha] = crf_log_partition_cuda(
      emissions, mask, std::nullopt, start_transitions, end_transitions, transitions);
  const auto gold_grads = crf_log_partition_backward_cuda(
      grad, emissions, mask, pinned, start_transitions, end_transitions, transitions, gold_alpha, gold);
  const auto free_grads = crf_log_partition_backward_cuda(
      grad.neg(), emissions, mask, std::nullopt, start_transitions, end_transitions, transitions,
      free_alpha, log_z);
  return {std::get<0>(gold_grads) + std::get<0>(free_grads),
          std::get<1>(gold_grads) + std::get<1>(free_grads),
          std::get<2>(gold_grads) + std::get<2>(free_grads),
          std::get<3>(gold_grads) + std::get<3>(free_grads)};
}

}  // namespace
}  // namespace fastnlp

#ifndef FASTNLP_CUDA_EMULATION  // the emulation build calls the functions directly
TORCH_LIBRARY_IMPL(fastnlp, CUDA, m) {
  m.impl("crf_log_partition", &fastnlp::crf_log_partition_cuda);
  m.impl("crf_log_partition_backward", &fastnlp::crf_log_partition_backward_cuda);
  m.impl("crf_log_likelihood", &fastnlp::crf_log_likelihood_cuda);
  m.impl("crf_log_likelihood_backward", &fastnlp::crf_log_likelihood_backward_cuda);
  m.impl("crf_viterbi", &fastnlp::crf_viterbi_cuda);
  m.impl("crf_viterbi_topk", &fastnlp::crf_viterbi_topk_cuda);
}
#endif
