// Host launchers for the linear-chain CRF CUDA kernels.
//
// Torch-free on purpose: raw device pointers, sizes and a stream in, a
// cudaError_t out (the error of the launch itself; kernels run asynchronously
// on `stream`). csrc/cuda/crf_binding.cpp adapts them to the fastnlp ops
// declared in csrc/ops.cpp, which also documents the semantics.
//
// Layouts, all contiguous, batch first:
//   emissions (B, T, K), mask (B, T) bool, tags (B, T) int64 or nullptr,
//   start_transitions (K), end_transitions (K),
//   transitions (K, K) with transitions[i * K + j] scoring tag i -> tag j.
// Every floating pointer of one call has the same type (float or double);
// the arithmetic is done in that type.
//
// Scratch: each launcher has a *_workspace_bytes query (scalar_bytes = 4 for
// float, 8 for double). Allocate that many bytes (aligned to 256 bytes, as
// cudaMalloc and the torch caching allocator are) and pass them as
// `workspace`; pass nullptr when the query returns 0 (it also returns 0 for
// invalid sizes). The contents need no initialisation, and the buffer may be
// reused once the kernel has finished on `stream`.
//
// Shared memory: at most 48 KB per block, so no opt-in is needed on any
// architecture. The transitions are staged there when K * (K | 1) * scalar
// bytes <= 32 KB (float: K <= 90, double: K <= 63), otherwise read from global
// memory. The per-step state vectors (2K, 3K for the backward, 2Kk for top-k
// scalars) go there when they fit in the rest, otherwise into the workspace,
// so any K works; only the speed changes.
//
// Invalid scores: a score is valid when it is finite or -inf (a forbidden
// state or move). NaN or +inf leaves log Z undefined, so a sequence with one
// at a selected position of its emissions, or every sequence when a
// parameter (start, end or transitions) holds one, is invalid: its
// log_partition, alpha, Viterbi and k-best scores are NaN, and its gradients
// are NaN (grad_emissions at its selected positions, 0 at the others, and its
// parameter shares). Its Viterbi path is decoded as for any sequence (NaN
// wins, as in torch.max); its k-best paths are unspecified. An empty
// sequence (nothing selected) is invalid too when a parameter is. A valid
// sequence whose log Z overflows to +inf gets zero gradients. The CPU
// kernels (csrc/cpu/crf.cpp) follow the same rules.
//
// Sizes: B, T >= 0, 1 <= K, B < 2^31. B == 0 returns cudaSuccess without
// launching; T == 0 is valid (every sequence empty). Invalid sizes return
// cudaErrorInvalidValue.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace fastnlp {
namespace cuda_impl {

// ---------------------------------------------------------------------------
// Forward algorithm.
// Outputs: log_partition (B), alpha (B, T, K).
// A selected tag outside [-1, K) excludes every state at that position, so the
// sequence has no consistent path: its alpha is -inf from there on and its
// log_partition is -inf (its gradient is then zero).
int64_t crf_log_partition_workspace_bytes(int64_t B, int64_t K, int64_t scalar_bytes);

cudaError_t crf_log_partition(const float* emissions, const bool* mask, const int64_t* tags,
                              const float* start_transitions, const float* end_transitions,
                              const float* transitions, int64_t B, int64_t T, int64_t K,
                              float* log_partition, float* alpha, void* workspace,
                              cudaStream_t stream);
cudaError_t crf_log_partition(const double* emissions, const bool* mask, const int64_t* tags,
                              const double* start_transitions, const double* end_transitions,
                              const double* transitions, int64_t B, int64_t T, int64_t K,
                              double* log_partition, double* alpha, void* workspace,
                              cudaStream_t stream);

// ---------------------------------------------------------------------------
// Backward of sum_b grad_log_partition[b] * log_partition[b], from the alpha
// and log_partition that crf_log_partition returned for the same inputs.
// Outputs: grad_emissions (B, T, K) and the per-sequence parameter gradients
// grad_start_per_seq (B, K), grad_end_per_seq (B, K),
// grad_transitions_per_seq (B, K, K); the caller sums those over B (kept per
// sequence so the result does not depend on atomics' ordering). Every output
// element is written.
int64_t crf_log_partition_backward_workspace_bytes(int64_t B, int64_t K, int64_t scalar_bytes);

cudaError_t crf_log_partition_backward(const float* grad_log_partition, const float* emissions,
                                       const bool* mask, const int64_t* tags,
                                       const float* end_transitions, const float* transitions,
                                       const float* alpha, const float* log_partition, int64_t B,
                                       int64_t T, int64_t K, float* grad_emissions,
                                       float* grad_start_per_seq, float* grad_end_per_seq,
                                       float* grad_transitions_per_seq, void* workspace,
                                       cudaStream_t stream);
cudaError_t crf_log_partition_backward(const double* grad_log_partition, const double* emissions,
                                       const bool* mask, const int64_t* tags,
                                       const double* end_transitions, const double* transitions,
                                       const double* alpha, const double* log_partition, int64_t B,
                                       int64_t T, int64_t K, double* grad_emissions,
                                       double* grad_start_per_seq, double* grad_end_per_seq,
                                       double* grad_transitions_per_seq, void* workspace,
                                       cudaStream_t stream);

// ---------------------------------------------------------------------------
// Viterbi decoding. Outputs: paths (B, T) int64 (-1 at unselected positions),
// scores (B). The workspace holds int32 backpointers (B, T, K), so it is never
// empty when B, T > 0.
int64_t crf_viterbi_workspace_bytes(int64_t B, int64_t T, int64_t K, int64_t scalar_bytes);

cudaError_t crf_viterbi(const float* emissions, const bool* mask, const float* start_transitions,
                        const float* end_transitions, const float* transitions, int64_t B,
                        int64_t T, int64_t K, int64_t* paths, float* scores, void* workspace,
                        cudaStream_t stream);
cudaError_t crf_viterbi(const double* emissions, const bool* mask,
                        const double* start_transitions, const double* end_transitions,
                        const double* transitions, int64_t B, int64_t T, int64_t K,
                        int64_t* paths, double* scores, void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------------------
// k-best Viterbi. Outputs: paths (B, T, k) int64, scores (B, k), best first.
// Needs 1 <= k and K * k < 2^31. The workspace holds int32 backpointers
// (B, T, K, k), so it grows with k.
int64_t crf_viterbi_topk_workspace_bytes(int64_t B, int64_t T, int64_t K, int64_t k,
                                        int64_t scalar_bytes);

cudaError_t crf_viterbi_topk(const float* emissions, const bool* mask,
                             const float* start_transitions, const float* end_transitions,
                             const float* transitions, int64_t B, int64_t T, int64_t K, int64_t k,
                             int64_t* paths, float* scores, void* workspace, cudaStream_t stream);
cudaError_t crf_viterbi_topk(const double* emissions, const bool* mask,
                             const double* start_transitions, const double* end_transitions,
                             const double* transitions, int64_t B, int64_t T, int64_t K,
                             int64_t k, int64_t* paths, double* scores, void* workspace,
                             cudaStream_t stream);

}  // namespace cuda_impl
}  // namespace fastnlp
