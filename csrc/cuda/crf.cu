// CUDA kernels for the linear-chain CRF ops (semantics: csrc/ops.cpp and crf.h).
//
// Layout of the work: one thread block per sequence, thread j owning tag j
// (j += blockDim.x when K is larger than the block). Time is sequential, so a
// block walks its sequence with a __syncthreads between selected positions;
// the batch supplies the parallelism across SMs. Every branch that decides
// whether a __syncthreads is reached depends only on the sequence (mask, tags,
// log_partition of that b), never on the thread, so the block stays converged
// at each barrier.
//
// Shared memory: the transition matrix is staged with an odd row stride, so
// that reading a column (thread j walks i: forward, Viterbi, pairwise
// gradient) and reading a row (thread i walks j: backward algorithm) are both
// free of bank conflicts for 4-byte words. The per-step state vectors (scores
// of the previous position etc.) live there too when they fit; otherwise they
// live in a per-sequence slice of the caller's workspace, and the transitions
// are read from global memory (L1/L2 resident in practice).
//
// Arithmetic is in the scalar type: float for float32, double for float64.
// Log-sum-exp is the exact two-pass form (max, then the sum of exp); a max of
// -inf returns -inf so that fully constrained transitions (-inf) never turn
// into NaN.

#include "crf.h"
#include "launch.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastnlp {
namespace cuda_impl {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kWarpSize = 32;
// Staying under the 48 KB that every architecture grants without an opt-in
// keeps the launch free of cudaFuncSetAttribute calls and device queries.
constexpr int64_t kSmemBudget = 48 * 1024;
constexpr int64_t kTransSmemBudget = 32 * 1024;
constexpr int64_t kWorkspaceAlign = 256;

template <typename scalar_t>
struct Math;

template <>
struct Math<float> {
  static __device__ __forceinline__ float inf() { return static_cast<float>(INFINITY); }
  static __device__ __forceinline__ float nan() { return static_cast<float>(NAN); }
  static __device__ __forceinline__ float exp(float x) { return ::expf(x); }
  static __device__ __forceinline__ float log(float x) { return ::logf(x); }
};

template <>
struct Math<double> {
  static __device__ __forceinline__ double inf() { return static_cast<double>(INFINITY); }
  static __device__ __forceinline__ double nan() { return static_cast<double>(NAN); }
  static __device__ __forceinline__ double exp(double x) { return ::exp(x); }
  static __device__ __forceinline__ double log(double x) { return ::log(x); }
};

template <typename scalar_t>
__device__ __forceinline__ bool is_nan(scalar_t x) {
  return x != x;
}

// Lets a NaN win and stick, so NaN inputs give NaN outputs as torch.logsumexp does.
template <typename scalar_t>
__device__ __forceinline__ scalar_t nan_max(scalar_t m, scalar_t x) {
  return (x > m || is_nan(x)) ? x : m;
}

// A score is valid when it is finite or -inf (a forbidden state or move).
template <typename scalar_t>
__device__ __forceinline__ bool invalid_score(scalar_t x) {
  return is_nan(x) || x == Math<scalar_t>::inf();
}

// Whether sequence b has an invalid score (crf.h): NaN or +inf at one of its
// selected positions, or in any parameter. The same answer in every thread
// of the block, after a barrier. Pass start == nullptr to skip it.
template <typename scalar_t>
__device__ __forceinline__ bool invalid_sequence(const scalar_t* em, const bool* mask, int64_t T, int K,
                                                 const scalar_t* start, const scalar_t* end,
                                                 const scalar_t* transitions) {
  bool invalid = false;
  for (int64_t idx = threadIdx.x; idx < T * K; idx += blockDim.x)
    invalid = invalid || (mask[idx / K] && invalid_score(em[idx]));
  for (int64_t idx = threadIdx.x; idx < static_cast<int64_t>(K) * K; idx += blockDim.x)
    invalid = invalid || invalid_score(transitions[idx]);
  for (int j = threadIdx.x; j < K; j += blockDim.x)
    invalid = invalid || invalid_score(end[j]) || (start != nullptr && invalid_score(start[j]));
  return __syncthreads_or(invalid) != 0;
}

// log(sum_i exp(term(i))) for i < n.
template <typename scalar_t, typename Term>
__device__ __forceinline__ scalar_t log_sum_exp(int n, const Term& term) {
  using M = Math<scalar_t>;
  scalar_t m = -M::inf();
  for (int i = 0; i < n; ++i) m = nan_max(m, term(i));
  // exp(x - m) would be exp(-inf + inf) = NaN for m = -inf (no finite term);
  // +inf and NaN are already the answer.
  if (!(m > -M::inf() && m < M::inf())) return m;
  scalar_t s = 0;
  for (int i = 0; i < n; ++i) s += M::exp(term(i) - m);
  return m + M::log(s);
}

// log_sum_exp over i < n split across the lanes of a full warp. Butterfly
// (xor) reductions leave every lane with the bitwise same value (each step
// adds two partials that are equal up to commutation), so the early return
// below is warp-uniform and the shuffles stay converged.
template <typename scalar_t, typename Term>
__device__ __forceinline__ scalar_t warp_log_sum_exp(int n, int lane, const Term& term) {
  using M = Math<scalar_t>;
  constexpr unsigned kFull = 0xffffffffu;
  scalar_t m = -M::inf();
  for (int i = lane; i < n; i += kWarpSize) m = nan_max(m, term(i));
  for (int off = kWarpSize / 2; off > 0; off /= 2) m = nan_max(m, __shfl_xor_sync(kFull, m, off));
  if (!(m > -M::inf() && m < M::inf())) return m;
  scalar_t s = 0;
  for (int i = lane; i < n; i += kWarpSize) s += M::exp(term(i) - m);
  for (int off = kWarpSize / 2; off > 0; off /= 2) s += __shfl_xor_sync(kFull, s, off);
  return m + M::log(s);
}

// The order in which top-k candidates are ranked: score descending, then the
// smaller list index, then the smaller rank. NaN ranks above every number
// (as in torch.topk), which keeps the order total and makes k = 1 pick what
// the Viterbi kernel's NaN-propagating argmax picks.
template <typename scalar_t>
__device__ __forceinline__ bool precedes(scalar_t s1, int i1, int r1, scalar_t s2, int i2,
                                         int r2) {
  const bool n1 = is_nan(s1), n2 = is_nan(s2);
  if (n1 != n2) return n1;
  if (!n1 && s1 != s2) return s1 > s2;
  return i1 < i2 || (i1 == i2 && r1 < r2);
}

// Emits, in order, the `count` first candidates among n_lists lists of
// list_len candidates each, candidate (i, r) scoring value(i, r). Each list
// must already be in `precedes` order (score non-increasing in r), which holds
// because lists are earlier k-best lists plus a per-list constant and float
// addition is monotone. That lets each pass find "the first candidate after
// the previous pick" with one bisection per list instead of per-thread arrays
// of size K. Only a NaN born inside a list (-inf + inf) can break the order;
// the search then stays in bounds, and a rank it cannot fill is emitted as NaN
// with candidate (0, 0), a valid backpointer.
template <typename scalar_t, typename Value, typename Emit>
__device__ __forceinline__ void select_k_best(int n_lists, int list_len, int count,
                                              const Value& value, const Emit& emit) {
  scalar_t ps = 0;
  int pi = 0, pr = 0;
  for (int n = 0; n < count; ++n) {
    bool found = false;
    scalar_t bs = 0;
    int bi = 0, br = 0;
    for (int i = 0; i < n_lists; ++i) {
      int r = 0;
      if (n > 0) {
        int lo = 0, hi = list_len;
        while (lo < hi) {
          const int mid = (lo + hi) / 2;
          if (precedes(ps, pi, pr, value(i, mid), i, mid)) {
            hi = mid;
          } else {
            lo = mid + 1;
          }
        }
        if (lo == list_len) continue;
        r = lo;
      }
      const scalar_t v = value(i, r);
      if (!found || precedes(v, i, r, bs, bi, br)) {
        found = true;
        bs = v;
        bi = i;
        br = r;
      }
    }
    if (!found) {
      const scalar_t nan = Math<scalar_t>::nan();
      for (; n < count; ++n) emit(n, nan, 0, 0);
      return;
    }
    emit(n, bs, bi, br);
    ps = bs;
    pi = bi;
    pr = br;
  }
}

// Number of paths kept per state after one more link: K predecessors with
// n_valid ranks each, capped at k.
__device__ __forceinline__ int ranks_after_link(int K, int n_valid, int k) {
  const int64_t n = static_cast<int64_t>(K) * n_valid;
  return n < k ? static_cast<int>(n) : k;
}

// Where a block's transitions and state vectors live.
template <typename scalar_t>
struct BlockMemory {
  const scalar_t* trans;  // element (i, j) at trans[i * ld + j]
  int64_t ld;
  scalar_t* vec;
};

// Stages the transitions (if kTransShared) and picks the vector storage; ends
// with a barrier so the staged matrix is visible to the whole block.
template <typename scalar_t, bool kTransShared, bool kVecShared>
__device__ __forceinline__ BlockMemory<scalar_t> block_memory(const scalar_t* transitions, int K,
                                                              int ld_shared, int64_t vec_elems,
                                                              scalar_t* vec_global) {
  scalar_t* smem = reinterpret_cast<scalar_t*>(dynamic_shared_memory());
  BlockMemory<scalar_t> mem;
  if constexpr (kVecShared) {
    mem.vec = smem;
  } else {
    mem.vec = vec_global + static_cast<int64_t>(blockIdx.x) * vec_elems;
  }
  if constexpr (kTransShared) {
    scalar_t* staged = smem + (kVecShared ? vec_elems : 0);
    for (int idx = threadIdx.x; idx < K * K; idx += blockDim.x) {
      staged[(idx / K) * ld_shared + idx % K] = transitions[idx];
    }
    mem.trans = staged;
    mem.ld = ld_shared;
  } else {
    mem.trans = transitions;
    mem.ld = K;
  }
  __syncthreads();
  return mem;
}

// ---------------------------------------------------------------------------
// Forward algorithm. vec = [prev (K) | cur (K)], swapped every selected step so
// a single barrier per step separates the reads of one step from the writes of
// the next.
template <typename scalar_t, bool kTransShared, bool kVecShared>
__global__ void __launch_bounds__(kMaxThreads)
    crf_forward_kernel(const scalar_t* __restrict__ emissions, const bool* __restrict__ mask,
                       const int64_t* __restrict__ tags, const scalar_t* __restrict__ start,
                       const scalar_t* __restrict__ end, const scalar_t* __restrict__ transitions,
                       int64_t T, int K, int ld_shared, scalar_t* __restrict__ log_partition,
                       scalar_t* __restrict__ alpha, scalar_t* __restrict__ vec_global) {
  using M = Math<scalar_t>;
  const int64_t b = blockIdx.x;
  const BlockMemory<scalar_t> mem = block_memory<scalar_t, kTransShared, kVecShared>(
      transitions, K, ld_shared, 2 * static_cast<int64_t>(K), vec_global);
  scalar_t* prev = mem.vec;
  scalar_t* cur = mem.vec + K;
  bool started = false;

  if (invalid_sequence(emissions + b * T * K, mask + b * T, T, K, start, end, transitions)) {
    // NaN throughout, which the backward kernel reads as "invalid".
    const scalar_t nan = M::nan();
    for (int64_t idx = threadIdx.x; idx < T * K; idx += blockDim.x) alpha[b * T * K + idx] = nan;
    if (threadIdx.x == 0) log_partition[b] = nan;
    return;
  }

  for (int64_t t = 0; t < T; ++t) {
    const int64_t bt = b * T + t;
    scalar_t* alpha_row = alpha + bt * K;
    if (!mask[bt]) {
      for (int j = threadIdx.x; j < K; j += blockDim.x) alpha_row[j] = -M::inf();
      continue;
    }
    const int64_t tag = tags != nullptr ? tags[bt] : -1;
    const scalar_t* em_row = emissions + bt * K;
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      scalar_t a = -M::inf();
      if (tag == -1 || tag == j) {
        if (!started) {
          a = start[j] + em_row[j];
        } else {
          const scalar_t* col = mem.trans + j;
          const int64_t ld = mem.ld;
          a = em_row[j] + log_sum_exp<scalar_t>(K, [&](int i) { return prev[i] + col[i * ld]; });
        }
      }
      alpha_row[j] = a;
      cur[j] = a;
    }
    __syncthreads();
    scalar_t* tmp = prev;
    prev = cur;
    cur = tmp;
    started = true;
  }

  if (threadIdx.x == 0) {
    log_partition[b] =
        started ? log_sum_exp<scalar_t>(K, [&](int j) { return prev[j] + end[j]; }) : scalar_t(0);
  }
}

// ---------------------------------------------------------------------------
// log sum_j exp(alpha_row[j] + beta[j]): a position's normaliser, which is
// log Z in exact arithmetic. The posteriors are exp(x - this) rather than
// exp(x - log Z): alpha + beta - log Z cancels to ulp(|log Z|), which is
// 1e-3 already for float32 at |log Z| ~ 1e4, and overflows at |scores| ~ 1e20
// in double (as the CPU kernel's normalise_log_weights). The first warp
// computes it; a barrier publishes it through *slot to the block.
template <typename scalar_t>
__device__ __forceinline__ scalar_t position_log_norm(int K, const scalar_t* alpha_row, const scalar_t* beta,
                                                      scalar_t* slot) {
  if (threadIdx.x < kWarpSize) {
    const scalar_t norm =
        warp_log_sum_exp<scalar_t>(K, threadIdx.x, [&](int j) { return alpha_row[j] + beta[j]; });
    if (threadIdx.x == 0) *slot = norm;
  }
  __syncthreads();
  return *slot;
}

// exp(x - norm), and 0 where no path passes the position (norm -inf, which a
// finite log Z rules out bar rounding).
template <typename scalar_t>
__device__ __forceinline__ scalar_t posterior(scalar_t x, scalar_t norm) {
  using M = Math<scalar_t>;
  return norm > -M::inf() ? M::exp(x - norm) : scalar_t(0);
}

// Backward algorithm fused with the gradient: walking the selected positions
// from the last, beta (the log-score of the continuations from each state,
// excluding the emission there) is advanced one link at a time and the unary
// and pairwise posteriors of that link are accumulated on the way, each
// position's normalised by its own sum (position_log_norm).
// vec = [w (K) | alpha_prev (K) | beta (K)], w[j] = emission + beta at the
// current position, -inf where a pinned tag excludes j. Four barriers per
// link: one publishes w and alpha_prev; the next beta at the previous
// position, the next its normaliser; the last frees w, alpha_prev and the
// normaliser's slot for the following link.
template <typename scalar_t, bool kTransShared, bool kVecShared>
__global__ void __launch_bounds__(kMaxThreads) crf_backward_kernel(
    const scalar_t* __restrict__ grad_log_partition, const scalar_t* __restrict__ emissions,
    const bool* __restrict__ mask, const int64_t* __restrict__ tags,
    const scalar_t* __restrict__ end, const scalar_t* __restrict__ transitions,
    const scalar_t* __restrict__ alpha, const scalar_t* __restrict__ log_partition, int64_t T,
    int K, int ld_shared, scalar_t* __restrict__ grad_emissions, scalar_t* __restrict__ grad_start,
    scalar_t* __restrict__ grad_end, scalar_t* __restrict__ grad_transitions,
    scalar_t* __restrict__ vec_global) {
  using M = Math<scalar_t>;
  const int64_t b = blockIdx.x;
  const BlockMemory<scalar_t> mem = block_memory<scalar_t, kTransShared, kVecShared>(
      transitions, K, ld_shared, 3 * static_cast<int64_t>(K), vec_global);
  scalar_t* w = mem.vec;
  scalar_t* alpha_prev = mem.vec + K;
  scalar_t* beta = mem.vec + 2 * K;
  const int64_t ld = mem.ld;

  const scalar_t g = grad_log_partition[b];
  const scalar_t log_z = log_partition[b];
  scalar_t* ge = grad_emissions + b * T * K;
  scalar_t* gt = grad_transitions + b * K * K;

  // Column j of the per-sequence transition gradient is owned by thread j for
  // the whole kernel (zeroed here, accumulated below), so no barrier is needed
  // between the two and the accumulation order is fixed.
  for (int j = threadIdx.x; j < K; j += blockDim.x) {
    grad_start[b * K + j] = 0;
    grad_end[b * K + j] = 0;
    for (int i = 0; i < K; ++i) gt[static_cast<int64_t>(i) * K + j] = 0;
  }
  auto zero_row = [&](int64_t t) {
    for (int j = threadIdx.x; j < K; j += blockDim.x) ge[t * K + j] = 0;
  };

  // An invalid score (the forward kernel made log Z NaN): NaN at the selected
  // positions and in the parameter shares, 0 at the other positions.
  if (is_nan(log_z)) {
    const scalar_t nan = M::nan();
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t value = mask[b * T + t] ? nan : scalar_t(0);
      for (int j = threadIdx.x; j < K; j += blockDim.x) ge[t * K + j] = value;
    }
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      grad_start[b * K + j] = nan;
      grad_end[b * K + j] = nan;
      for (int i = 0; i < K; ++i) gt[static_cast<int64_t>(i) * K + j] = nan;
    }
    return;
  }
  // No consistent path (log Z = -inf: the loss is constant in the inputs
  // there), or valid scores whose sum overflowed (+inf): no gradient, as on
  // the CPU.
  if (!(log_z > -M::inf() && log_z < M::inf())) {
    for (int64_t t = 0; t < T; ++t) zero_row(t);
    return;
  }

  int64_t t = T - 1;
  while (t >= 0 && !mask[b * T + t]) zero_row(t--);
  if (t < 0) return;
  for (int j = threadIdx.x; j < K; j += blockDim.x) beta[j] = end[j];
  __syncthreads();
  __shared__ scalar_t norm_slot;
  scalar_t norm = position_log_norm<scalar_t>(K, alpha + (b * T + t) * K, beta, &norm_slot);

  for (bool last = true;; last = false) {
    int64_t tp = t - 1;
    while (tp >= 0 && !mask[b * T + tp]) zero_row(tp--);

    const int64_t bt = b * T + t;
    const int64_t tag = tags != nullptr ? tags[bt] : -1;
    const scalar_t* alpha_row = alpha + bt * K;
    const scalar_t* em_row = emissions + bt * K;
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      const scalar_t beta_j = beta[j];
      const scalar_t p = g * posterior(alpha_row[j] + beta_j, norm);
      ge[t * K + j] = p;
      if (last) grad_end[b * K + j] = p;
      if (tp < 0) grad_start[b * K + j] = p;
      w[j] = (tag == -1 || tag == j) ? em_row[j] + beta_j : -M::inf();
      if (tp >= 0) alpha_prev[j] = alpha[(b * T + tp) * K + j];
    }
    if (tp < 0) break;
    __syncthreads();

    // beta at tp: a log-sum-exp along row i of the transitions. Staged rows
    // are conflict-free for a thread per row (odd stride); rows in global
    // memory would be read with a stride of K across the threads, so there a
    // warp takes each row and its lanes read consecutive elements.
    if constexpr (kTransShared) {
      for (int i = threadIdx.x; i < K; i += blockDim.x) {
        const scalar_t* row = mem.trans + i * ld;
        beta[i] = log_sum_exp<scalar_t>(K, [&](int j) { return row[j] + w[j]; });
      }
    } else {
      const int lane = threadIdx.x % kWarpSize;
      const int n_warps = blockDim.x / kWarpSize;
      for (int i = threadIdx.x / kWarpSize; i < K; i += n_warps) {
        const scalar_t* row = mem.trans + i * ld;
        const scalar_t b_i =
            warp_log_sum_exp<scalar_t>(K, lane, [&](int j) { return row[j] + w[j]; });
        if (lane == 0) beta[i] = b_i;
      }
    }
    __syncthreads();
    norm = position_log_norm<scalar_t>(K, alpha_prev, beta, &norm_slot);
    // Pairwise posteriors of the link (tp -> t); thread j walks column j so
    // that consecutive threads touch consecutive addresses of gt.
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      const scalar_t w_j = w[j];
      if (w_j == -M::inf()) continue;  // exp(...) == 0 for every i
      const scalar_t* col = mem.trans + j;
      for (int i = 0; i < K; ++i) {
        gt[static_cast<int64_t>(i) * K + j] +=
            g * posterior(alpha_prev[i] + col[i * ld] + w_j, norm);
      }
    }
    __syncthreads();
    t = tp;
  }
}

// ---------------------------------------------------------------------------
// Viterbi. Scores are formed as (prev + transition) + emission before the
// comparison, the same association pytorch-crf uses, so that near-ties round
// the same way; the first maximal index wins (torch.max), a NaN wins and
// sticks. vec = [prev (K) | cur (K)].
template <typename scalar_t, bool kTransShared, bool kVecShared>
__global__ void __launch_bounds__(kMaxThreads)
    crf_viterbi_kernel(const scalar_t* __restrict__ emissions, const bool* __restrict__ mask,
                       const scalar_t* __restrict__ start, const scalar_t* __restrict__ end,
                       const scalar_t* __restrict__ transitions, int64_t T, int K, int ld_shared,
                       int64_t* __restrict__ paths, scalar_t* __restrict__ scores,
                       int32_t* __restrict__ backpointers, scalar_t* __restrict__ vec_global) {
  const int64_t b = blockIdx.x;
  const BlockMemory<scalar_t> mem = block_memory<scalar_t, kTransShared, kVecShared>(
      transitions, K, ld_shared, 2 * static_cast<int64_t>(K), vec_global);
  scalar_t* prev = mem.vec;
  scalar_t* cur = mem.vec + K;
  const int64_t ld = mem.ld;
  int64_t t_first = -1;
  // The path is still decoded (NaN wins, as above); the score is NaN.
  const bool invalid = invalid_sequence(emissions + b * T * K, mask + b * T, T, K, start, end, transitions);

  for (int64_t t = 0; t < T; ++t) {
    const int64_t bt = b * T + t;
    if (!mask[bt]) continue;
    const scalar_t* em_row = emissions + bt * K;
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      const scalar_t e = em_row[j];
      if (t_first < 0) {
        cur[j] = start[j] + e;
        continue;
      }
      const scalar_t* col = mem.trans + j;
      scalar_t best = (prev[0] + col[0]) + e;
      int arg = 0;
      for (int i = 1; i < K; ++i) {
        const scalar_t v = (prev[i] + col[i * ld]) + e;
        if (v > best || (is_nan(v) && !is_nan(best))) {
          best = v;
          arg = i;
        }
      }
      cur[j] = best;
      backpointers[bt * K + j] = arg;
    }
    __syncthreads();
    scalar_t* tmp = prev;
    prev = cur;
    cur = tmp;
    if (t_first < 0) t_first = t;
  }

  // The backtrace is inherently sequential; it costs O(T) against the O(T K^2)
  // recursion, so one thread does it (the barrier above published prev and
  // every backpointer).
  if (threadIdx.x != 0) return;
  int64_t* path = paths + b * T;
  if (t_first < 0) {  // the empty path
    scores[b] = invalid ? Math<scalar_t>::nan() : scalar_t(0);
    for (int64_t t = 0; t < T; ++t) path[t] = -1;
    return;
  }
  scalar_t best = prev[0] + end[0];
  int state = 0;
  for (int j = 1; j < K; ++j) {
    const scalar_t v = prev[j] + end[j];
    if (v > best || (is_nan(v) && !is_nan(best))) {
      best = v;
      state = j;
    }
  }
  scores[b] = invalid ? Math<scalar_t>::nan() : best;
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t bt = b * T + t;
    if (!mask[bt]) {
      path[t] = -1;
      continue;
    }
    path[t] = state;
    if (t != t_first) state = backpointers[bt * K + state];
  }
}

// ---------------------------------------------------------------------------
// k-best Viterbi. For each selected position and state j the k best partial
// paths ending in j are kept sorted, with backpointers packed as
// prev_state * k + prev_rank. All states of a position hold the same number
// of existing ranks (n_valid = min(k, K^(length-1))), a block-uniform value.
// vec = [prev (K * k) | cur (K * k)], state-major.
template <typename scalar_t, bool kTransShared, bool kVecShared>
__global__ void __launch_bounds__(kMaxThreads) crf_viterbi_topk_kernel(
    const scalar_t* __restrict__ emissions, const bool* __restrict__ mask,
    const scalar_t* __restrict__ start, const scalar_t* __restrict__ end,
    const scalar_t* __restrict__ transitions, int64_t T, int K, int k, int ld_shared,
    int64_t* __restrict__ paths, scalar_t* __restrict__ scores, int32_t* __restrict__ backpointers,
    int32_t* __restrict__ final_states, scalar_t* __restrict__ vec_global) {
  using M = Math<scalar_t>;
  const int64_t b = blockIdx.x;
  const int64_t kk = k;
  const BlockMemory<scalar_t> mem = block_memory<scalar_t, kTransShared, kVecShared>(
      transitions, K, ld_shared, 2 * K * kk, vec_global);
  scalar_t* prev = mem.vec;
  scalar_t* cur = mem.vec + K * kk;
  const int64_t ld = mem.ld;
  int n_valid = 0;
  int64_t t_first = -1;
  // The paths are still decoded; every score is NaN.
  const bool invalid = invalid_sequence(emissions + b * T * K, mask + b * T, T, K, start, end, transitions);

  for (int64_t t = 0; t < T; ++t) {
    const int64_t bt = b * T + t;
    if (!mask[bt]) continue;
    const scalar_t* em_row = emissions + bt * K;
    const int n_next = n_valid == 0 ? 1 : ranks_after_link(K, n_valid, k);
    for (int j = threadIdx.x; j < K; j += blockDim.x) {
      const scalar_t e = em_row[j];
      scalar_t* out = cur + j * kk;
      if (n_valid == 0) {
        out[0] = start[j] + e;
        continue;
      }
      const scalar_t* col = mem.trans + j;
      int32_t* bp = backpointers + (bt * K + j) * kk;
      select_k_best<scalar_t>(
          K, n_valid, n_next,
          [&](int i, int r) { return (prev[i * kk + r] + col[i * ld]) + e; },
          [&](int n, scalar_t v, int i, int r) {
            out[n] = v;
            bp[n] = static_cast<int32_t>(i * kk + r);
          });
    }
    __syncthreads();
    scalar_t* tmp = prev;
    prev = cur;
    cur = tmp;
    n_valid = n_next;
    if (t_first < 0) t_first = t;
  }

  scalar_t* score_row = scores + b * kk;
  int32_t* fin = final_states + b * kk;
  if (threadIdx.x == 0) {
    int n_final = 0;
    if (t_first < 0) {
      score_row[0] = 0;
      fin[0] = -1;
      n_final = 1;
    } else {
      n_final = ranks_after_link(K, n_valid, k);
      select_k_best<scalar_t>(
          K, n_valid, n_final, [&](int j, int r) { return prev[j * kk + r] + end[j]; },
          [&](int n, scalar_t v, int j, int r) {
            score_row[n] = v;
            fin[n] = static_cast<int32_t>(j * kk + r);
          });
    }
    for (int n = n_final; n < k; ++n) {
      score_row[n] = -M::inf();
      fin[n] = -1;
    }
    if (invalid) {
      for (int n = 0; n < k; ++n) score_row[n] = M::nan();
    }
  }
  __syncthreads();

  // One thread per rank walks its path back; ranks are the fastest axis of
  // paths, so the writes of a warp coalesce.
  for (int n = threadIdx.x; n < k; n += blockDim.x) {
    int32_t state = fin[n];
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t bt = b * T + t;
      int64_t* out = paths + bt * kk + n;
      if (!mask[bt] || state < 0) {
        *out = -1;
        continue;
      }
      const int32_t j = state / k;
      const int32_t r = state % k;
      *out = j;
      if (t != t_first) state = backpointers[(bt * K + j) * kk + r];
    }
  }
}

// ---------------------------------------------------------------------------
// Host side.

// A whole number of warps: the warp reductions rely on full warps.
int block_threads(int64_t K) {
  const int64_t warps = (K + kWarpSize - 1) / kWarpSize;
  return static_cast<int>(std::min<int64_t>(kMaxThreads, warps * kWarpSize));
}

int64_t align_up(int64_t bytes) {
  return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

struct SmemPlan {
  bool trans_shared;
  bool vec_shared;
  int ld;  // row stride of the staged transitions
  int64_t smem_bytes;
};

// The transitions get shared memory first: every thread reads a distinct
// element of them, while the vector reads are broadcasts that the L1 serves
// almost as well.
SmemPlan make_plan(int64_t K, int64_t vec_elems, int64_t scalar_bytes) {
  SmemPlan plan;
  // Odd: see the file comment.
  plan.ld = static_cast<int>(K | 1);
  const int64_t trans_bytes = K * plan.ld * scalar_bytes;
  plan.trans_shared = trans_bytes <= kTransSmemBudget;
  const int64_t used = plan.trans_shared ? trans_bytes : 0;
  const int64_t vec_bytes = vec_elems * scalar_bytes;
  plan.vec_shared = vec_bytes <= kSmemBudget - used;
  plan.smem_bytes = used + (plan.vec_shared ? vec_bytes : 0);
  return plan;
}

int64_t vec_workspace_bytes(const SmemPlan& plan, int64_t B, int64_t vec_elems,
                            int64_t scalar_bytes) {
  return plan.vec_shared ? 0 : align_up(B * vec_elems * scalar_bytes);
}

bool sizes_ok(int64_t B, int64_t T, int64_t K) {
  return B >= 0 && T >= 0 && K >= 1 && B <= std::numeric_limits<int32_t>::max() &&
         K <= std::numeric_limits<int32_t>::max();
}

// Calls launch(trans_shared, vec_shared) with both as compile-time constants.
template <typename Launch>
void with_plan(const SmemPlan& plan, const Launch& launch) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (plan.trans_shared && plan.vec_shared) {
    launch(Yes{}, Yes{});
  } else if (plan.trans_shared) {
    launch(Yes{}, No{});
  } else if (plan.vec_shared) {
    launch(No{}, Yes{});
  } else {
    launch(No{}, No{});
  }
}

template <typename scalar_t>
cudaError_t launch_forward(const scalar_t* emissions, const bool* mask, const int64_t* tags,
                           const scalar_t* start, const scalar_t* end,
                           const scalar_t* transitions, int64_t B, int64_t T, int64_t K,
                           scalar_t* log_partition, scalar_t* alpha, void* workspace,
                           cudaStream_t stream) {
  if (!sizes_ok(B, T, K)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const int64_t vec_elems = 2 * K;
  const SmemPlan plan = make_plan(K, vec_elems, sizeof(scalar_t));
  if (!plan.vec_shared && workspace == nullptr) return cudaErrorInvalidValue;
  scalar_t* vec_global = static_cast<scalar_t*>(workspace);
  const unsigned grid = static_cast<unsigned>(B);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  with_plan(plan, [&](auto ts, auto vs) {
    launch_kernel(crf_forward_kernel<scalar_t, decltype(ts)::value, decltype(vs)::value>, grid,
                  block_threads(K), smem, stream, emissions, mask, tags, start, end, transitions, T,
                  static_cast<int>(K), plan.ld, log_partition, alpha, vec_global);
  });
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_backward(const scalar_t* grad_log_partition, const scalar_t* emissions,
                            const bool* mask, const int64_t* tags, const scalar_t* end,
                            const scalar_t* transitions, const scalar_t* alpha,
                            const scalar_t* log_partition, int64_t B, int64_t T, int64_t K,
                            scalar_t* grad_emissions, scalar_t* grad_start, scalar_t* grad_end,
                            scalar_t* grad_transitions, void* workspace, cudaStream_t stream) {
  if (!sizes_ok(B, T, K)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const int64_t vec_elems = 3 * K;
  const SmemPlan plan = make_plan(K, vec_elems, sizeof(scalar_t));
  if (!plan.vec_shared && workspace == nullptr) return cudaErrorInvalidValue;
  scalar_t* vec_global = static_cast<scalar_t*>(workspace);
  const unsigned grid = static_cast<unsigned>(B);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  with_plan(plan, [&](auto ts, auto vs) {
    launch_kernel(crf_backward_kernel<scalar_t, decltype(ts)::value, decltype(vs)::value>, grid,
                  block_threads(K), smem, stream, grad_log_partition, emissions, mask, tags, end,
                  transitions, alpha, log_partition, T, static_cast<int>(K), plan.ld, grad_emissions,
                  grad_start, grad_end, grad_transitions, vec_global);
  });
  return cudaGetLastError();
}

// Viterbi workspace: [backpointers (B, T, K) int32 | state vectors if global].
int64_t viterbi_workspace(int64_t B, int64_t T, int64_t K, int64_t scalar_bytes,
                          int64_t* vec_offset) {
  const int64_t vec_elems = 2 * K;
  const SmemPlan plan = make_plan(K, vec_elems, scalar_bytes);
  *vec_offset = align_up(B * T * K * static_cast<int64_t>(sizeof(int32_t)));
  return *vec_offset + vec_workspace_bytes(plan, B, vec_elems, scalar_bytes);
}

template <typename scalar_t>
cudaError_t launch_viterbi(const scalar_t* emissions, const bool* mask, const scalar_t* start,
                           const scalar_t* end, const scalar_t* transitions, int64_t B, int64_t T,
                           int64_t K, int64_t* paths, scalar_t* scores, void* workspace,
                           cudaStream_t stream) {
  if (!sizes_ok(B, T, K)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  const int64_t vec_elems = 2 * K;
  const SmemPlan plan = make_plan(K, vec_elems, sizeof(scalar_t));
  int64_t vec_offset = 0;
  if (viterbi_workspace(B, T, K, sizeof(scalar_t), &vec_offset) > 0 && workspace == nullptr) {
    return cudaErrorInvalidValue;
  }
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  int32_t* backpointers = reinterpret_cast<int32_t*>(ws);
  scalar_t* vec_global = plan.vec_shared ? nullptr : reinterpret_cast<scalar_t*>(ws + vec_offset);
  const unsigned grid = static_cast<unsigned>(B);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  with_plan(plan, [&](auto ts, auto vs) {
    launch_kernel(crf_viterbi_kernel<scalar_t, decltype(ts)::value, decltype(vs)::value>, grid,
                  block_threads(K), smem, stream, emissions, mask, start, end, transitions, T,
                  static_cast<int>(K), plan.ld, paths, scores, backpointers, vec_global);
  });
  return cudaGetLastError();
}

bool topk_sizes_ok(int64_t B, int64_t T, int64_t K, int64_t k) {
  return sizes_ok(B, T, K) && k >= 1 && K * k <= std::numeric_limits<int32_t>::max();
}

// Top-k workspace: [backpointers (B, T, K, k) int32 | final states (B, k) int32
// | state vectors if global].
int64_t topk_workspace(int64_t B, int64_t T, int64_t K, int64_t k, int64_t scalar_bytes,
                       int64_t* final_offset, int64_t* vec_offset) {
  const int64_t vec_elems = 2 * K * k;
  const SmemPlan plan = make_plan(K, vec_elems, scalar_bytes);
  const int64_t i32 = sizeof(int32_t);
  *final_offset = align_up(B * T * K * k * i32);
  *vec_offset = *final_offset + align_up(B * k * i32);
  return *vec_offset + vec_workspace_bytes(plan, B, vec_elems, scalar_bytes);
}

template <typename scalar_t>
cudaError_t launch_viterbi_topk(const scalar_t* emissions, const bool* mask,
                                const scalar_t* start, const scalar_t* end,
                                const scalar_t* transitions, int64_t B, int64_t T, int64_t K,
                                int64_t k, int64_t* paths, scalar_t* scores, void* workspace,
                                cudaStream_t stream) {
  if (!topk_sizes_ok(B, T, K, k)) return cudaErrorInvalidValue;
  if (B == 0) return cudaSuccess;
  if (workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t vec_elems = 2 * K * k;
  const SmemPlan plan = make_plan(K, vec_elems, sizeof(scalar_t));
  int64_t final_offset = 0, vec_offset = 0;
  topk_workspace(B, T, K, k, sizeof(scalar_t), &final_offset, &vec_offset);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  int32_t* backpointers = reinterpret_cast<int32_t*>(ws);
  int32_t* final_states = reinterpret_cast<int32_t*>(ws + final_offset);
  scalar_t* vec_global = plan.vec_shared ? nullptr : reinterpret_cast<scalar_t*>(ws + vec_offset);
  // Enough threads for the per-rank backtrace too.
  const int threads = std::max(block_threads(K), block_threads(k));
  const unsigned grid = static_cast<unsigned>(B);
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  with_plan(plan, [&](auto ts, auto vs) {
    launch_kernel(crf_viterbi_topk_kernel<scalar_t, decltype(ts)::value, decltype(vs)::value>, grid,
                  threads, smem, stream, emissions, mask, start, end, transitions, T,
                  static_cast<int>(K), static_cast<int>(k), plan.ld, paths, scores, backpointers,
                  final_states, vec_global);
  });
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------
// Public entry points (crf.h).

int64_t crf_log_partition_workspace_bytes(int64_t B, int64_t K, int64_t scalar_bytes) {
  if (!sizes_ok(B, 0, K)) return 0;
  const SmemPlan plan = make_plan(K, 2 * K, scalar_bytes);
  return vec_workspace_bytes(plan, B, 2 * K, scalar_bytes);
}

int64_t crf_log_partition_backward_workspace_bytes(int64_t B, int64_t K, int64_t scalar_bytes) {
  if (!sizes_ok(B, 0, K)) return 0;
  const SmemPlan plan = make_plan(K, 3 * K, scalar_bytes);
  return vec_workspace_bytes(plan, B, 3 * K, scalar_bytes);
}

int64_t crf_viterbi_workspace_bytes(int64_t B, int64_t T, int64_t K, int64_t scalar_bytes) {
  if (!sizes_ok(B, T, K)) return 0;
  int64_t vec_offset = 0;
  return viterbi_workspace(B, T, K, scalar_bytes, &vec_offset);
}

int64_t crf_viterbi_topk_workspace_bytes(int64_t B, int64_t T, int64_t K, int64_t k,
                                         int64_t scalar_bytes) {
  if (!topk_sizes_ok(B, T, K, k)) return 0;
  int64_t final_offset = 0, vec_offset = 0;
  return topk_workspace(B, T, K, k, scalar_bytes, &final_offset, &vec_offset);
}

cudaError_t crf_log_partition(const float* emissions, const bool* mask, const int64_t* tags,
                              const float* start_transitions, const float* end_transitions,
                              const float* transitions, int64_t B, int64_t T, int64_t K,
                              float* log_partition, float* alpha, void* workspace,
                              cudaStream_t stream) {
  return launch_forward(emissions, mask, tags, start_transitions, end_transitions, transitions, B,
                        T, K, log_partition, alpha, workspace, stream);
}

cudaError_t crf_log_partition(const double* emissions, const bool* mask, const int64_t* tags,
                              const double* start_transitions, const double* end_transitions,
                              const double* transitions, int64_t B, int64_t T, int64_t K,
                              double* log_partition, double* alpha, void* workspace,
                              cudaStream_t stream) {
  return launch_forward(emissions, mask, tags, start_transitions, end_transitions, transitions, B,
                        T, K, log_partition, alpha, workspace, stream);
}

cudaError_t crf_log_partition_backward(const float* grad_log_partition, const float* emissions,
                                       const bool* mask, const int64_t* tags,
                                       const float* end_transitions, const float* transitions,
                                       const float* alpha, const float* log_partition, int64_t B,
                                       int64_t T, int64_t K, float* grad_emissions,
                                       float* grad_start_per_seq, float* grad_end_per_seq,
                                       float* grad_transitions_per_seq, void* workspace,
                                       cudaStream_t stream) {
  return launch_backward(grad_log_partition, emissions, mask, tags, end_transitions, transitions,
                         alpha, log_partition, B, T, K, grad_emissions, grad_start_per_seq,
                         grad_end_per_seq, grad_transitions_per_seq, workspace, stream);
}

cudaError_t crf_log_partition_backward(const double* grad_log_partition, const double* emissions,
                                       const bool* mask, const int64_t* tags,
                                       const double* end_transitions, const double* transitions,
                                       const double* alpha, const double* log_partition, int64_t B,
                                       int64_t T, int64_t K, double* grad_emissions,
                                       double* grad_start_per_seq, double* grad_end_per_seq,
                                       double* grad_transitions_per_seq, void* workspace,
                                       cudaStream_t stream) {
  return launch_backward(grad_log_partition, emissions, mask, tags, end_transitions, transitions,
                         alpha, log_partition, B, T, K, grad_emissions, grad_start_per_seq,
                         grad_end_per_seq, grad_transitions_per_seq, workspace, stream);
}

cudaError_t crf_viterbi(const float* emissions, const bool* mask, const float* start_transitions,
                        const float* end_transitions, const float* transitions, int64_t B,
                        int64_t T, int64_t K, int64_t* paths, float* scores, void* workspace,
                        cudaStream_t stream) {
  return launch_viterbi(emissions, mask, start_transitions, end_transitions, transitions, B, T, K,
                        paths, scores, workspace, stream);
}

cudaError_t crf_viterbi(const double* emissions, const bool* mask,
                        const double* start_transitions, const double* end_transitions,
                        const double* transitions, int64_t B, int64_t T, int64_t K,
                        int64_t* paths, double* scores, void* workspace, cudaStream_t stream) {
  return launch_viterbi(emissions, mask, start_transitions, end_transitions, transitions, B, T, K,
                        paths, scores, workspace, stream);
}

cudaError_t crf_viterbi_topk(const float* emissions, const bool* mask,
                             const float* start_transitions, const float* end_transitions,
                             const float* transitions, int64_t B, int64_t T, int64_t K, int64_t k,
                             int64_t* paths, float* scores, void* workspace, cudaStream_t stream) {
  return launch_viterbi_topk(emissions, mask, start_transitions, end_transitions, transitions, B,
                             T, K, k, paths, scores, workspace, stream);
}

cudaError_t crf_viterbi_topk(const double* emissions, const bool* mask,
                             const double* start_transitions, const double* end_transitions,
                             const double* transitions, int64_t B, int64_t T, int64_t K,
                             int64_t k, int64_t* paths, double* scores, void* workspace,
                             cudaStream_t stream) {
  return launch_viterbi_topk(emissions, mask, start_transitions, end_transitions, transitions, B,
                             T, K, k, paths, scores, workspace, stream);
}

}  // namespace cuda_impl
}  // namespace fastnlp
