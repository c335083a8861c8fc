// Linear-chain CRF on the CPU: forward algorithm, its backward (posterior
// marginals), Viterbi and k-best Viterbi. Parallel over the batch; each
// sequence walks its selected positions once, with no Python loop over time.
//
// The forward and backward recursions run in scaled exponent space: with
// E[i][j] = exp(trans[i][j] - colmax[j]) computed once per call, one step is a
// K x K multiply-add plus 2K exp/log, instead of K^2 exps in log space.
// Entries whose scaled sum is so small that it may have lost precision are
// recomputed exactly in log space, so the result never depends on the data
// being "nice".
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/vector_loops.h"

namespace fastnlp {
namespace {

template <typename acc_t>
constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

// Below this a scaled sum may be made of underflowed terms; recompute exactly.
template <typename acc_t>
acc_t tiny_sum() {
  return std::sqrt(std::numeric_limits<acc_t>::min());
}

// The states a position may take: a pinned tag allows one, a free one all K.
struct StateRange {
  int64_t lo, hi;
  int64_t size() const { return hi - lo; }
};

inline StateRange allowed_states(const int64_t* tags, int64_t t, int64_t K) {
  if (tags == nullptr || tags[t] < 0) return {0, K};
  return {tags[t], tags[t] + 1};
}

// Per-call constants shared by every sequence of the batch, in the
// accumulation type (double: float32 rounding at |alpha| ~ 200 would already
// cost the 1e-6 relative accuracy we promise against pytorch-crf).
using acc_t = double;

// A score is valid when it is finite or -inf (a forbidden state or move).
// NaN or +inf leaves log Z undefined (at best inf - inf), so a sequence that
// meets one at a selected position, or any sequence when a transition
// parameter holds one, gets NaN for every result and gradient, whatever path
// the scaled or exact arithmetic would otherwise take.
template <typename scalar_t>
bool invalid_scores(const scalar_t* x, int64_t n) {
  return any_nan_or_inf(n, x);
}

// The selected positions of one sequence's emissions (T, K). One vector pass
// over all of them first: row by row only when something is invalid, to see
// whether it is at a selected position.
template <typename scalar_t>
bool invalid_emissions(const scalar_t* emissions, const bool* mask, int64_t T, int64_t K) {
  if (!invalid_scores(emissions, T * K)) return false;
  for (int64_t t = 0; t < T; ++t)
    if (mask[t] && invalid_scores(emissions + t * K, K)) return true;
  return false;
}

template <typename scalar_t>
bool invalid_parameters(const scalar_t* start, const scalar_t* end, const scalar_t* trans, int64_t K) {
  return invalid_scores(start, K) || invalid_scores(end, K) || invalid_scores(trans, K * K);
}

constexpr acc_t kNaN = std::numeric_limits<acc_t>::quiet_NaN();

struct Transitions {
  int64_t K;
  std::vector<acc_t> start, end, trans;  // trans[i * K + j]: tag i -> tag j
  std::vector<acc_t> colmax;             // max_i trans[i][j]
  std::vector<acc_t> scaled;             // E[i][j] = exp(trans[i][j] - colmax[j]), row-major
  std::vector<acc_t> scaled_t;           // E transposed, so both recursions stream rows
  bool invalid;                          // a parameter is NaN or +inf: every sequence is NaN

  template <typename scalar_t>
  Transitions(const scalar_t* start_, const scalar_t* end_, const scalar_t* trans_, int64_t K_)
      : K(K_), start(start_, start_ + K_), end(end_, end_ + K_), trans(trans_, trans_ + K_ * K_),
        colmax(K_, kNegInf<acc_t>), scaled(K_ * K_), scaled_t(K_ * K_),
        invalid(invalid_parameters(start_, end_, trans_, K_)) {
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) colmax[j] = std::max(colmax[j], trans[i * K + j]);
    for (int64_t i = 0; i < K; ++i) {
      for (int64_t j = 0; j < K; ++j) {
        const acc_t e = colmax[j] == kNegInf<acc_t> ? acc_t(0) : std::exp(trans[i * K + j] - colmax[j]);
        scaled[i * K + j] = e;
        scaled_t[j * K + i] = e;
      }
    }
  }
};

template <typename acc_t>
acc_t logsumexp(const acc_t* x, int64_t n) {
  acc_t m = kNegInf<acc_t>;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (m == kNegInf<acc_t>) return m;
  acc_t s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(x[i] - m);
  return m + std::log(s);
}

// x (n) holds a position's log-weights alpha[t][i] + beta[t][i]; replaces
// them with the probabilities exp(x[i] - lse(x)) and returns lse(x). In exact
// arithmetic lse(x) is log Z at every position, but alpha + beta - log Z
// cancels to ulp(|log Z|): off by 1e-5 at |scores| ~ 1e10 in double, by 0.13
// with the float32 alpha and log Z that crf_log_partition saves for float32
// inputs at ~1e4, and at ~1e20 exp overflows. Normalised by their
// own sum the probabilities sum to 1, and where one state dominates (as at such
// magnitudes) they are exactly 0 and 1. No path through the position (every
// x[i] -inf, which a finite log Z rules out bar rounding): zeros, and -inf.
inline acc_t normalise_log_weights(int64_t n, acc_t* x) {
  acc_t m = kNegInf<acc_t>;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  if (m == kNegInf<acc_t>) {
    std::fill(x, x + n, acc_t(0));
    return m;
  }
  exp_shifted(n, x, m, x);
  acc_t sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += x[i];
  for (int64_t i = 0; i < n; ++i) x[i] /= sum;
  return m + std::log(sum);
}

// log sum_{i in prev} exp(prev_alpha[i] + trans[i][j]), exactly.
inline acc_t exact_column(const Transitions& tr, const acc_t* prev_alpha, StateRange prev, int64_t j,
                          acc_t* scratch) {
  for (int64_t i = prev.lo; i < prev.hi; ++i) scratch[i - prev.lo] = prev_alpha[i] + tr.trans[i * tr.K + j];
  return logsumexp(scratch, prev.size());
}

// ---------------------------------------------------------------------------
// Forward algorithm for one sequence. Writes alpha (T, K) and returns log Z.
template <typename scalar_t, typename alpha_t>
acc_t forward_sequence(const Transitions& tr, const scalar_t* emissions, const bool* mask, const int64_t* tags,
                       int64_t T, alpha_t* alpha, acc_t* work) {
  const int64_t K = tr.K;
  acc_t* prev_alpha = work;      // alpha at the previous selected position
  acc_t* row = work + K;         // alpha at this one
  acc_t* p = work + 2 * K;       // exp(prev_alpha - m)
  acc_t* s = work + 3 * K;       // scaled sums
  acc_t* logs = work + 4 * K;    // their logs
  acc_t* scratch = work + 5 * K;
  bool started = false;
  StateRange prev{0, 0};
  for (int64_t t = 0; t < T; ++t) {
    alpha_t* out = alpha + t * K;
    if (!mask[t]) {
      std::fill(out, out + K, -std::numeric_limits<alpha_t>::infinity());
      continue;
    }
    const StateRange cur = allowed_states(tags, t, K);
    const scalar_t* e = emissions + t * K;
    std::fill(row, row + K, kNegInf<acc_t>);
    if (!started) {
      for (int64_t j = cur.lo; j < cur.hi; ++j) row[j] = tr.start[j] + acc_t(e[j]);
    } else if (prev.size() == 1) {
      // Pinned predecessor: plain additions, exact like a gold-path score.
      const int64_t i = prev.lo;
      for (int64_t j = cur.lo; j < cur.hi; ++j) row[j] = prev_alpha[i] + tr.trans[i * K + j] + acc_t(e[j]);
    } else {
      acc_t m = kNegInf<acc_t>;
      for (int64_t i = prev.lo; i < prev.hi; ++i) m = std::max(m, prev_alpha[i]);
      if (m != kNegInf<acc_t>) {
        exp_shifted(prev.size(), prev_alpha + prev.lo, m, p + prev.lo);
        vecmat(prev.size(), cur.size(), p + prev.lo, tr.scaled.data() + prev.lo * K + cur.lo, K, s + cur.lo);
        log_array(cur.size(), s + cur.lo, logs + cur.lo);
        for (int64_t j = cur.lo; j < cur.hi; ++j) {
          if (tr.colmax[j] == kNegInf<acc_t>) continue;
          row[j] = s[j] > tiny_sum<acc_t>() ? logs[j] + m + tr.colmax[j] + acc_t(e[j])
                                            : exact_column(tr, prev_alpha, prev, j, scratch) + acc_t(e[j]);
        }
      }
    }
    for (int64_t j = 0; j < K; ++j) out[j] = static_cast<alpha_t>(row[j]);
    std::swap(prev_alpha, row);
    prev = cur;
    started = true;
  }
  if (!started) return 0;  // empty sequence
  for (int64_t j = prev.lo; j < prev.hi; ++j) scratch[j - prev.lo] = prev_alpha[j] + tr.end[j];
  return logsumexp(scratch, prev.size());
}

// One sequence's share of the gradients of the parameters shared by the batch.
// Each sequence has its own slots, summed in batch order afterwards, so the
// result does not depend on which thread ran which sequence.
struct ParamGrads {
  acc_t* start;  // (K,)
  acc_t* end;    // (K,)
  acc_t* trans;  // (K, K)
};

// The gradient of a sequence with an invalid score (see invalid_scores): NaN
// at its selected positions, 0 at the others as for every sequence, and NaN
// shares of the parameter gradients.
template <typename grad_t>
void invalid_sequence_gradient(const bool* mask, int64_t T, int64_t K, grad_t* grad_emissions, ParamGrads grads) {
  for (int64_t t = 0; t < T; ++t)
    std::fill(grad_emissions + t * K, grad_emissions + (t + 1) * K,
              mask[t] ? std::numeric_limits<grad_t>::quiet_NaN() : grad_t(0));
  std::fill(grads.start, grads.start + K, kNaN);
  std::fill(grads.end, grads.end + K, kNaN);
  std::fill(grads.trans, grads.trans + K * K, kNaN);
}

// ---------------------------------------------------------------------------
// Backward algorithm for one sequence: beta, then the posterior marginals
// scaled by g, written to grad_emissions (T, K) (zero-initialised) and added to
// the parameter gradients.
template <typename scalar_t, typename alpha_t, typename grad_t>
void backward_sequence(const Transitions& tr, const scalar_t* emissions, const bool* mask, const int64_t* tags,
                       int64_t T, const alpha_t* alpha, acc_t log_z, acc_t g, grad_t* grad_emissions,
                       ParamGrads grads, acc_t* work) {
  const int64_t K = tr.K;
  if (std::isnan(log_z)) {  // an invalid score (the forward pass made log Z NaN)
    invalid_sequence_gradient(mask, T, K, grad_emissions, grads);
    return;
  }
  // Zeroed here, in the worker, rather than by a single-threaded at::zeros.
  std::fill(grad_emissions, grad_emissions + T * K, grad_t(0));
  if (!std::isfinite(log_z)) return;  // no path, or no consistent one: no gradient
  acc_t* beta = work;               // beta at the current position
  acc_t* beta_prev = work + K;      // beta at the previous selected position
  acc_t* w = work + 2 * K;          // emissions + beta at the current position
  acc_t* q = work + 3 * K;          // exp(w + colmax - mw)
  acc_t* r = work + 4 * K;          // scaled row sums
  acc_t* marginal = work + 5 * K;   // P(y_t = j)
  acc_t* marginal_prev = work + 6 * K;
  acc_t* coef = work + 7 * K;       // alpha[t'][i] + beta[t'][i], then g * P(y_t' = i) / r[i]
  acc_t* log_r = work + 8 * K;
  acc_t* scratch = work + 9 * K;

  int64_t t = T - 1;
  while (t >= 0 && !mask[t]) --t;
  if (t < 0) return;
  StateRange cur = allowed_states(tags, t, K);
  std::fill(beta, beta + K, kNegInf<acc_t>);
  for (int64_t j = cur.lo; j < cur.hi; ++j) beta[j] = tr.end[j];
  // At the last position the marginal needs its own exp; earlier ones are
  // carried over from the pairwise step (see below).
  for (int64_t j = cur.lo; j < cur.hi; ++j) marginal[j] = acc_t(alpha[t * K + j]) + beta[j];
  normalise_log_weights(cur.size(), marginal + cur.lo);
  bool last = true;
  while (true) {
    const scalar_t* e = emissions + t * K;
    grad_t* ge = grad_emissions + t * K;
    if (cur.size() == 1) marginal[cur.lo] = 1;  // every consistent path passes a pinned state
    for (int64_t j = cur.lo; j < cur.hi; ++j) ge[j] = static_cast<grad_t>(g * marginal[j]);
    if (last)
      for (int64_t j = cur.lo; j < cur.hi; ++j) grads.end[j] += g * marginal[j];
    last = false;
    int64_t tp = t - 1;
    while (tp >= 0 && !mask[tp]) --tp;
    if (tp < 0) {
      for (int64_t j = cur.lo; j < cur.hi; ++j) grads.start[j] += g * marginal[j];
      return;
    }
    const StateRange prev = allowed_states(tags, tp, K);
    const alpha_t* ap = alpha + tp * K;
    std::fill(beta_prev, beta_prev + K, kNegInf<acc_t>);
    std::fill(marginal_prev, marginal_prev + K, acc_t(0));
    std::fill(w, w + K, kNegInf<acc_t>);
    for (int64_t j = cur.lo; j < cur.hi; ++j) w[j] = acc_t(e[j]) + beta[j];

    if (prev.size() == 1 && cur.size() == 1) {
      const int64_t i = prev.lo, j = cur.lo;
      beta_prev[i] = tr.trans[i * K + j] + w[j];
      grads.trans[i * K + j] += g;
    } else {
      acc_t mw = kNegInf<acc_t>;
      for (int64_t j = cur.lo; j < cur.hi; ++j) mw = std::max(mw, w[j] + tr.colmax[j]);
      if (mw != kNegInf<acc_t>) {
        std::fill(q, q + K, acc_t(0));
        for (int64_t j = cur.lo; j < cur.hi; ++j) q[j] = w[j] + tr.colmax[j];  // -inf columns give q = 0
        exp_shifted(cur.size(), q + cur.lo, mw, q + cur.lo);
        // beta_prev[i] = log sum_j E[i][j] q[j] + mw, streaming rows of E transposed.
        vecmat(cur.size(), prev.size(), q + cur.lo, tr.scaled_t.data() + cur.lo * K + prev.lo, K, r + prev.lo);
        log_array(prev.size(), r + prev.lo, log_r + prev.lo);
        for (int64_t i = prev.lo; i < prev.hi; ++i) {
          if (r[i] > tiny_sum<acc_t>()) {
            beta_prev[i] = log_r[i] + mw;
          } else {
            for (int64_t j = cur.lo; j < cur.hi; ++j) scratch[j - cur.lo] = tr.trans[i * K + j] + w[j];
            beta_prev[i] = logsumexp(scratch, cur.size());
          }
          coef[i] = acc_t(ap[i]) + beta_prev[i];
        }
        // P(y_t' = i), normalised over this position (see
        // normalise_log_weights); the step's pairwise marginals share the
        // normaliser: P(i, j) = exp(ap[i] + trans[i][j] + w[j] - n).
        const acc_t n = normalise_log_weights(prev.size(), coef + prev.lo);
        for (int64_t i = prev.lo; i < prev.hi; ++i) {
          marginal_prev[i] = coef[i];
          if (r[i] > tiny_sum<acc_t>()) {
            // P(i, j) = P(i) / r[i] * E[i][j] * q[j], summed below; P(i) / r[i]
            // stays below 1 / tiny_sum, so the products cannot overflow.
            coef[i] = g * coef[i] / r[i];
          } else if (coef[i] > 0) {
            // A row whose scaled sum underflowed: its pairwise marginals, exactly.
            coef[i] = 0;
            acc_t* gt = grads.trans + i * K;
            for (int64_t j = cur.lo; j < cur.hi; ++j)
              gt[j] += g * std::exp(acc_t(ap[i]) + tr.trans[i * K + j] + w[j] - n);
          } else {
            coef[i] = 0;
          }
        }
        // Pairwise marginals, times g: g * P(i) / r[i] * E[i][j] * q[j].
        scaled_outer_accumulate(prev.size(), cur.size(), coef + prev.lo, tr.scaled.data() + prev.lo * K + cur.lo, K,
                                q + cur.lo, grads.trans + prev.lo * K + cur.lo);
      }
    }
    std::swap(beta, beta_prev);
    std::swap(marginal, marginal_prev);
    t = tp;
    cur = prev;
  }
}

// ---------------------------------------------------------------------------
// Viterbi works in the input dtype (float32 or float64: fastnlp.ops widens
// half-precision input to float32), with pytorch-crf's order of additions, so
// for those dtypes both make the same choice even where rounding creates a tie.
template <typename scalar_t>
struct RawTransitions {
  int64_t K;
  const scalar_t* start;
  const scalar_t* end;
  const scalar_t* trans;
};

// a beats the best so far b as torch.max's argmax decides: larger, or NaN
// over a number (and the first of equal values or of NaNs stays).
template <typename scalar_t>
bool beats_nan_first(scalar_t a, scalar_t b) {
  return a > b || (std::isnan(a) && !std::isnan(b));
}

// maxplus_step with torch.max's choices where NaN is involved (see
// beats_nan_first), scalar: for sequences with an invalid score only, so
// that their decoded path is still pytorch-crf's.
template <typename scalar_t>
void maxplus_step_nan_first(int64_t K, const scalar_t* score, const scalar_t* trans, const scalar_t* e,
                            scalar_t* best, int32_t* backpointers) {
  for (int64_t j = 0; j < K; ++j) {
    scalar_t top = (score[0] + trans[j]) + e[j];
    int32_t arg = 0;
    for (int64_t i = 1; i < K; ++i) {
      const scalar_t v = (score[i] + trans[i * K + j]) + e[j];
      if (beats_nan_first(v, top)) top = v, arg = static_cast<int32_t>(i);
    }
    best[j] = top;
    backpointers[j] = arg;
  }
}

// ---------------------------------------------------------------------------
// Viterbi for one sequence; backpointers (T, K) in `backpointers`. With
// nan_first (a sequence with a NaN or +inf score), comparisons follow
// torch.max's NaN rule instead of skipping NaN, as pytorch-crf's decode does.
template <typename scalar_t>
scalar_t viterbi_sequence(const RawTransitions<scalar_t>& tr, const scalar_t* emissions, const bool* mask,
                          int64_t T, int64_t* path, int32_t* backpointers, scalar_t* work, bool nan_first) {
  const int64_t K = tr.K;
  scalar_t* score = work;
  scalar_t* best = work + K;
  int64_t first = -1, last = -1;
  for (int64_t t = 0; t < T; ++t) {
    path[t] = -1;
    if (!mask[t]) continue;
    const scalar_t* e = emissions + t * K;
    if (first < 0) {
      first = t;
      for (int64_t j = 0; j < K; ++j) score[j] = tr.start[j] + e[j];
    } else {
      if (nan_first)
        maxplus_step_nan_first(K, score, tr.trans, e, best, backpointers + t * K);
      else
        maxplus_step(K, score, tr.trans, e, best, backpointers + t * K);
      std::copy(best, best + K, score);
    }
    last = t;
  }
  if (first < 0) return 0;
  int64_t tag = 0;
  scalar_t top = score[0] + tr.end[0];
  for (int64_t j = 1; j < K; ++j) {
    const scalar_t v = score[j] + tr.end[j];
    if (nan_first ? beats_nan_first(v, top) : v > top) top = v, tag = j;
  }
  for (int64_t t = last; t >= first; --t) {
    if (!mask[t]) continue;
    path[t] = tag;
    if (t > first) tag = backpointers[t * K + tag];
  }
  return top;
}

// ---------------------------------------------------------------------------
// k-best Viterbi for one sequence. Each (position, state) keeps its k best
// partial paths, best first; a rank a state cannot fill has count < k.
template <typename scalar_t>
struct TopkScratch {
  std::vector<scalar_t> score, next;    // (K, k)
  std::vector<int64_t> count, next_count;  // valid ranks per state
  std::vector<int32_t> bp_tag, bp_rank; // (T, K, k)
  std::vector<int64_t> head;            // merge cursor per candidate list
};

// Merge K sorted candidate lists, taking up to k in the order
// (score desc, list index asc, rank asc). `score_of(i, r)` is list i's r-th.
template <typename scalar_t, typename ScoreOf, typename Take>
int64_t merge_topk(int64_t K, int64_t k, const int64_t* count, int64_t* head, ScoreOf score_of, Take take) {
  std::fill(head, head + K, 0);
  int64_t n = 0;
  for (; n < k; ++n) {
    int64_t best_i = -1;
    scalar_t best = kNegInf<scalar_t>;
    for (int64_t i = 0; i < K; ++i) {
      if (head[i] >= count[i]) continue;
      const scalar_t v = score_of(i, head[i]);
      if (best_i < 0 || v > best) best = v, best_i = i;
    }
    if (best_i < 0) break;
    take(n, best_i, head[best_i], best);
    ++head[best_i];
  }
  return n;
}

template <typename scalar_t>
void topk_sequence(const RawTransitions<scalar_t>& tr, const scalar_t* emissions, const bool* mask, int64_t T,
                   int64_t k, int64_t* paths, scalar_t* scores, TopkScratch<scalar_t>& s) {
  const int64_t K = tr.K;
  std::fill(paths, paths + T * k, -1);
  std::fill(scores, scores + k, kNegInf<scalar_t>);
  int64_t first = -1, last = -1;
  for (int64_t t = 0; t < T; ++t) {
    if (!mask[t]) continue;
    const scalar_t* e = emissions + t * K;
    if (first < 0) {
      first = t;
      for (int64_t j = 0; j < K; ++j) {
        s.score[j * k] = tr.start[j] + e[j];
        s.count[j] = 1;
      }
    } else {
      for (int64_t j = 0; j < K; ++j) {
        int32_t* bt = s.bp_tag.data() + (t * K + j) * k;
        int32_t* br = s.bp_rank.data() + (t * K + j) * k;
        scalar_t* out = s.next.data() + j * k;
        s.next_count[j] = merge_topk<scalar_t>(
            K, k, s.count.data(), s.head.data(),
            [&](int64_t i, int64_t r) { return s.score[i * k + r] + tr.trans[i * K + j] + e[j]; },
            [&](int64_t n, int64_t i, int64_t r, scalar_t v) {
              out[n] = v;
              bt[n] = static_cast<int32_t>(i);
              br[n] = static_cast<int32_t>(r);
            });
      }
      std::swap(s.score, s.next);
      std::swap(s.count, s.next_count);
    }
    last = t;
  }
  if (first < 0) {
    scores[0] = 0;  // the empty path
    return;
  }
  std::vector<int64_t> end_tag(k), end_rank(k);
  const int64_t found = merge_topk<scalar_t>(
      K, k, s.count.data(), s.head.data(), [&](int64_t j, int64_t r) { return s.score[j * k + r] + tr.end[j]; },
      [&](int64_t n, int64_t j, int64_t r, scalar_t v) {
        scores[n] = v;
        end_tag[n] = j;
        end_rank[n] = r;
      });
  for (int64_t n = 0; n < found; ++n) {
    int64_t tag = end_tag[n], rank = end_rank[n];
    for (int64_t t = last; t >= first; --t) {
      if (!mask[t]) continue;
      paths[t * k + n] = tag;
      if (t > first) {
        const int64_t at = (t * K + tag) * k + rank;
        tag = s.bp_tag[at];
        rank = s.bp_rank[at];
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Tensor-facing checks and the batch loops.

void check_inputs(const at::Tensor& emissions, const at::Tensor& mask, const at::Tensor& start,
                  const at::Tensor& end, const at::Tensor& trans) {
  TORCH_CHECK(emissions.dim() == 3, "emissions must be (batch, seq_len, num_tags), got ", emissions.sizes());
  TORCH_CHECK(emissions.scalar_type() == at::kFloat || emissions.scalar_type() == at::kDouble,
              "emissions must be float32 or float64, got ", emissions.scalar_type());
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  TORCH_CHECK(K >= 1, "num_tags must be positive");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == B && mask.size(1) == T, "mask must be (", B, ", ", T,
              "), got ", mask.sizes());
  TORCH_CHECK(start.dim() == 1 && start.size(0) == K, "start_transitions must be (", K, "), got ",
              start.sizes());
  TORCH_CHECK(end.dim() == 1 && end.size(0) == K, "end_transitions must be (", K, "), got ", end.sizes());
  TORCH_CHECK(trans.dim() == 2 && trans.size(0) == K && trans.size(1) == K, "transitions must be (", K, ", ",
              K, "), got ", trans.sizes());
  for (const at::Tensor* t : {&mask, &start, &end, &trans}) {
    TORCH_CHECK(t->device().is_cpu() && emissions.device().is_cpu(), "fastnlp CPU kernel got a tensor on ",
                t->device());
  }
  for (const at::Tensor* t : {&start, &end, &trans}) {
    TORCH_CHECK(t->scalar_type() == emissions.scalar_type(), "transition parameters must have the dtype of "
                "emissions (", emissions.scalar_type(), "), got ", t->scalar_type());
  }
}

// Tags are indices: out-of-range values would be out-of-bounds reads. A plain
// scan, not ATen ops: those cost more than the gold-path pass itself.
std::optional<at::Tensor> checked_tags(const std::optional<at::Tensor>& tags, const at::Tensor& mask, int64_t K) {
  if (!tags.has_value()) return std::nullopt;
  TORCH_CHECK(tags->scalar_type() == at::kLong, "tags must be int64, got ", tags->scalar_type());
  TORCH_CHECK(tags->device().is_cpu(), "fastnlp CPU kernel got tags on ", tags->device());
  TORCH_CHECK(tags->sizes() == mask.sizes(), "tags must be shaped like mask ", mask.sizes(), ", got ", tags->sizes());
  at::Tensor t = tags->contiguous();
  const int64_t* tag = t.data_ptr<int64_t>();
  const bool* selected = mask.data_ptr<bool>();
  for (int64_t x = 0; x < t.numel(); ++x) {
    TORCH_CHECK_INDEX(!selected[x] || (tag[x] >= -1 && tag[x] < K), "tags must be in [0, ", K,
                      ") or -1 (free) at selected positions, got ", tag[x]);
  }
  return t;
}

template <typename scalar_t>
Transitions make_transitions(const at::Tensor& start, const at::Tensor& end, const at::Tensor& trans) {
  return Transitions(start.data_ptr<scalar_t>(), end.data_ptr<scalar_t>(), trans.data_ptr<scalar_t>(), trans.size(0));
}

template <typename scalar_t>
RawTransitions<scalar_t> raw_transitions(const at::Tensor& start, const at::Tensor& end, const at::Tensor& trans) {
  return {trans.size(0), start.data_ptr<scalar_t>(), end.data_ptr<scalar_t>(), trans.data_ptr<scalar_t>()};
}

// Runs body(b, scratch) for every sequence b, where scratch is a per-thread
// object made by make_scratch(). Sequences differ in length, so they are handed
// out one at a time (dynamic schedule) rather than in fixed halves that leave a
// thread idle at the end.
template <typename MakeScratch, typename Body>
void for_each_sequence(int64_t B, const MakeScratch& make_scratch, const Body& body) {
#ifdef _OPENMP
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B)));
  std::vector<decltype(make_scratch())> scratch;
  for (int i = 0; i < threads; ++i) scratch.push_back(make_scratch());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t b = 0; b < B; ++b) body(b, scratch[omp_get_thread_num()]);
#else
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    auto scratch = make_scratch();
    for (int64_t b = b0; b < b1; ++b) body(b, scratch);
  });
#endif
}

std::tuple<at::Tensor, at::Tensor> crf_log_partition_cpu(const at::Tensor& emissions_in, const at::Tensor& mask_in,
                                                         const std::optional<at::Tensor>& tags_in,
                                                         const at::Tensor& start_in, const at::Tensor& end_in,
                                                         const at::Tensor& trans_in) {
  check_inputs(emissions_in, mask_in, start_in, end_in, trans_in);
  const at::Tensor emissions = emissions_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor start = start_in.contiguous(), end = end_in.contiguous(), trans = trans_in.contiguous();
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  const std::optional<at::Tensor> tags = checked_tags(tags_in, mask, K);
  at::Tensor log_z = at::empty({B}, emissions.options());
  at::Tensor alpha = at::empty({B, T, K}, emissions.options());
  if (B == 0) return {log_z, alpha};
  AT_DISPATCH_FLOATING_TYPES(emissions.scalar_type(), "crf_log_partition_cpu", [&] {
    const Transitions tr = make_transitions<scalar_t>(start, end, trans);
    const scalar_t* em = emissions.data_ptr<scalar_t>();
    const bool* mk = mask.data_ptr<bool>();
    const int64_t* tg = tags.has_value() ? tags->data_ptr<int64_t>() : nullptr;
    scalar_t* lz = log_z.data_ptr<scalar_t>();
    scalar_t* al = alpha.data_ptr<scalar_t>();
    for_each_sequence(
        B, [&] { return std::vector<acc_t>(6 * K); },
        [&](int64_t b, std::vector<acc_t>& work) {
          if (tr.invalid || invalid_emissions(em + b * T * K, mk + b * T, T, K)) {
            lz[b] = static_cast<scalar_t>(kNaN);  // the backward pass reads this as "invalid"
            std::fill(al + b * T * K, al + (b + 1) * T * K, static_cast<scalar_t>(kNaN));
            return;
          }
          lz[b] = static_cast<scalar_t>(forward_sequence(tr, em + b * T * K, mk + b * T, tg ? tg + b * T : nullptr,
                                                          T, al + b * T * K, work.data()));
        });
  });
  return {log_z, alpha};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_log_partition_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& emissions_in, const at::Tensor& mask_in,
    const std::optional<at::Tensor>& tags_in, const at::Tensor& start_in, const at::Tensor& end_in,
    const at::Tensor& trans_in, const at::Tensor& alpha_in, const at::Tensor& log_z_in) {
  check_inputs(emissions_in, mask_in, start_in, end_in, trans_in);
  const at::Tensor emissions = emissions_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor start = start_in.contiguous(), end = end_in.contiguous(), trans = trans_in.contiguous();
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  TORCH_CHECK(alpha_in.sizes() == emissions.sizes() && alpha_in.scalar_type() == emissions.scalar_type(),
              "alpha must match emissions, got ", alpha_in.sizes());
  TORCH_CHECK(log_z_in.dim() == 1 && log_z_in.size(0) == B && log_z_in.scalar_type() == emissions.scalar_type(),
              "log_partition must be (", B, "), got ", log_z_in.sizes());
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == B, "grad_log_partition must be (", B, "), got ",
              grad_in.sizes());
  const std::optional<at::Tensor> tags = checked_tags(tags_in, mask, K);
  const at::Tensor alpha = alpha_in.contiguous(), log_z = log_z_in.contiguous();
  const at::Tensor grad = grad_in.to(at::kDouble).contiguous();
  at::Tensor grad_emissions = at::empty_like(emissions);  // every element written by backward_sequence
  at::Tensor grad_start = at::zeros({K}, emissions.options());
  at::Tensor grad_end = at::zeros({K}, emissions.options());
  at::Tensor grad_trans = at::zeros({K, K}, emissions.options());
  if (B == 0) return {grad_emissions, grad_start, grad_end, grad_trans};
  AT_DISPATCH_FLOATING_TYPES(emissions.scalar_type(), "crf_log_partition_backward_cpu", [&] {
    const Transitions tr = make_transitions<scalar_t>(start, end, trans);
    const scalar_t* em = emissions.data_ptr<scalar_t>();
    const bool* mk = mask.data_ptr<bool>();
    const int64_t* tg = tags.has_value() ? tags->data_ptr<int64_t>() : nullptr;
    const scalar_t* al = alpha.data_ptr<scalar_t>();
    const scalar_t* lz = log_z.data_ptr<scalar_t>();
    const double* g = grad.data_ptr<double>();
    scalar_t* ge = grad_emissions.data_ptr<scalar_t>();
    const int64_t slot = 2 * K + K * K;
    std::vector<acc_t> per_sequence(B * slot, 0.0);
    for_each_sequence(
        B, [&] { return std::vector<acc_t>(10 * K); },
        [&](int64_t b, std::vector<acc_t>& work) {
          acc_t* mine = per_sequence.data() + b * slot;
          backward_sequence(tr, em + b * T * K, mk + b * T, tg ? tg + b * T : nullptr, T, al + b * T * K,
                            double(lz[b]), g[b], ge + b * T * K, ParamGrads{mine, mine + K, mine + 2 * K},
                            work.data());
        });
    scalar_t* gs = grad_start.data_ptr<scalar_t>();
    scalar_t* gn = grad_end.data_ptr<scalar_t>();
    scalar_t* gt = grad_trans.data_ptr<scalar_t>();
    std::vector<acc_t> total(slot, 0.0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t x = 0; x < slot; ++x) total[x] += per_sequence[b * slot + x];
    for (int64_t j = 0; j < K; ++j) gs[j] = static_cast<scalar_t>(total[j]), gn[j] = static_cast<scalar_t>(total[K + j]);
    for (int64_t x = 0; x < K * K; ++x) gt[x] = static_cast<scalar_t>(total[2 * K + x]);
  });
  return {grad_emissions, grad_start, grad_end, grad_trans};
}

// ---------------------------------------------------------------------------
// Fused log-likelihood (gold score minus log Z) and its gradient.
//
// The free chain runs in probability space: with E[i][j] = exp(trans[i][j] -
// colmax[j]) and x_t[j] = exp(e_t[j] + colmax[j] - m_t) (m_t their max), one
// step is a_t = (a_{t'} E) * x_t / s_t, s_t = max_j of the product, so every
// stored row has max 1 and log Z adds up m_t + log s_t: a K x K mat-vec, K exps
// and one log per step. The backward variables are scaled the same way, and
// since marginals are normalised per position (sum_j a_t[j] b_t[j]) the scales
// never need to be stored. A fully tagged gold path is a plain sum; partially
// tagged ones run the same recursion with the tagged positions pinned.
//
// The scaled recursions are exact as long as every nonzero factor (E, x, and
// a, b relative to their row's max) and every row's max is at least tiny: a
// product of three is then a normal number, so nothing that might later
// dominate is lost to underflow. Zeros stay exact zeros (constraints:
// exp(-inf) = 0). A sequence that breaks the bound, or that has no path at
// all, is recomputed by the exact log-space kernels above instead.
//
// They run in one of two precisions ("tiers"). float64 emissions use double.
// float32 emissions use float when the sequence's scores fit float's bound
// (ranges up to 27 nats: (1e-12)^3 is still normal), which halves the cost of
// every vector loop, and double otherwise (up to 230 nats). Either way log Z
// is summed in double and the float tier's weights are computed in double
// and rounded once, so the float tier's log-likelihood stays within ~1e-7
// relative of the exact value (pytorch-crf's own float32 log-space sums are
// less accurate than that).
template <typename calc_t>
struct Tier;
template <>
struct Tier<double> {
  static constexpr double kTiny = 1e-100;
  static constexpr double kLogTiny = -230.25850929940458;  // log(kTiny)
};
template <>
struct Tier<float> {
  static constexpr float kTiny = 1e-12f;
  static constexpr double kLogTiny = -27.631021115928547;  // log(1e-12)
};

// What the scaled recursions share across the batch, on top of Transitions,
// in the tier's type.
template <typename calc_t>
struct ScaledChain {
  const Transitions& tr;
  std::vector<calc_t> scaled, scaled_t;  // E and E transposed (Transitions), rounded to calc_t
  std::vector<calc_t> end_weight;        // exp(end[j] - end_max)
  acc_t end_max;
  bool representable;                    // every nonzero E[i][j] and end_weight[j] >= kTiny

  explicit ScaledChain(const Transitions& tr_)
      : tr(tr_), scaled(tr_.scaled.begin(), tr_.scaled.end()), scaled_t(tr_.scaled_t.begin(), tr_.scaled_t.end()),
        end_weight(tr_.K), end_max(kNegInf<acc_t>), representable(true) {
    const int64_t K = tr.K;
    const acc_t tiny = Tier<calc_t>::kTiny;
    for (int64_t j = 0; j < K; ++j) end_max = std::max(end_max, tr.end[j]);
    for (int64_t j = 0; j < K; ++j) {
      const acc_t w = end_max == kNegInf<acc_t> ? acc_t(0) : std::exp(tr.end[j] - end_max);
      end_weight[j] = static_cast<calc_t>(w);
      representable &= w == 0 || w >= tiny;
    }
    for (int64_t x = 0; x < K * K; ++x) representable &= tr.scaled[x] == 0 || tr.scaled[x] >= tiny;
    // NaN parameters: let the exact path produce whatever it produces.
    for (int64_t x = 0; x < K * K; ++x) representable &= !std::isnan(tr.scaled[x]);
    for (int64_t j = 0; j < K; ++j) representable &= !std::isnan(end_weight[j]) && !std::isnan(tr.start[j]);
  }
};

// Tags of one sequence with "unknown" as -1: ignore_index and unselected
// positions map to -1. Returns whether any selected position is unknown.
bool map_tags(const int64_t* tags, const bool* mask, int64_t T, int64_t ignore_index, int64_t* mapped) {
  bool partial = false;
  for (int64_t t = 0; t < T; ++t) {
    const bool unknown = !mask[t] || tags[t] == ignore_index;
    mapped[t] = unknown ? -1 : tags[t];
    partial |= mask[t] && unknown;
  }
  return partial;
}

// Gold score of a fully tagged sequence, added in the order the pinned
// log-space recursion adds them.
template <typename scalar_t>
acc_t gold_path_score(const Transitions& tr, const scalar_t* emissions, const bool* mask, const int64_t* tags,
                      int64_t T) {
  const int64_t K = tr.K;
  acc_t score = 0;
  int64_t prev = -1;
  for (int64_t t = 0; t < T; ++t) {
    if (!mask[t]) continue;
    const int64_t y = tags[t];
    const acc_t e = acc_t(emissions[t * K + y]);
    score = prev < 0 ? tr.start[y] + e : score + tr.trans[prev * K + y] + e;
    prev = y;
  }
  return prev < 0 ? acc_t(0) : score + tr.end[prev];
}

// Forward recursion for one chain (free when tags is null, else pinned where
// tags >= 0). Writes, for every position t, the emission weights x (T, K) and
// the forward row a (T, K) (zeros where the mask excludes t), and log Z of the
// chain to *log_z. The row at t is (a_{t'} E) * x_t / s_{t'}: unnormalised by
// its own max s_t, which the next step divides out, so each row costs one
// pass. shifts: scratch (T); scores: scratch (T, K) for the log-weights
// before their exp, which may be x itself in the double tier. False: not
// representable exactly in calc_t.
template <typename calc_t, typename scalar_t>
bool scaled_forward(const ScaledChain<calc_t>& c, const scalar_t* emissions, const bool* mask, const int64_t* tags,
                    int64_t T, calc_t* a, calc_t* x, acc_t* log_z, acc_t* shifts, acc_t* scores) {
  const Transitions& tr = c.tr;
  const int64_t K = tr.K;
  // Emission weights of every position first, so that one exp call covers them all.
  // Rows past the last selected position (a padded batch's tail) are weight
  // 0 without an exp.
  int64_t end = T;
  while (end > 0 && !mask[end - 1]) --end;
  std::fill(x + end * K, x + T * K, calc_t(0));
  bool first = true;
  int64_t tiny = 0;
  for (int64_t t = 0; t < end; ++t) {
    acc_t* y = scores + t * K;
    if (!mask[t]) {
      std::fill(y, y + K, kNegInf<acc_t>);
      continue;
    }
    const acc_t* base = first ? tr.start.data() : tr.colmax.data();
    const scalar_t* e = emissions + t * K;
    const StateRange cur = allowed_states(tags, t, K);
    if (cur.size() == 1) {
      std::fill(y, y + K, kNegInf<acc_t>);
      y[cur.lo] = 0;
      shifts[t] = base[cur.lo] + acc_t(e[cur.lo]);
    } else {
      int64_t small = 0;
      shifts[t] = shifted_scores(K, base, e, Tier<calc_t>::kLogTiny, y, &small);
      tiny += small;
    }
    if (!std::isfinite(shifts[t])) return false;  // nothing reachable, or inf/NaN: the exact path decides
    first = false;
  }
  if (tiny) return false;
  exp_shifted(end * K, scores, 0.0, x);

  const calc_t* prev = nullptr;
  StateRange prev_range{0, 0};
  calc_t inv_prev = 1;
  acc_t log_scale = 0;
  for (int64_t t = 0; t < T; ++t) {
    calc_t* row = a + t * K;
    if (!mask[t]) {
      std::fill(row, row + K, calc_t(0));
      continue;
    }
    const StateRange cur = allowed_states(tags, t, K);
    const calc_t* xt = x + t * K;
    calc_t top = 1;  // max of x at the first position (exp(0))
    if (prev == nullptr) {
      std::copy(xt, xt + K, row);
    } else {
      if (cur.size() < K) std::fill(row, row + K, calc_t(0));
      int64_t small = 0;
      top = scaled_step(prev_range.size(), cur.size(), prev + prev_range.lo,
                        c.scaled.data() + prev_range.lo * K + cur.lo, K, xt + cur.lo, inv_prev,
                        Tier<calc_t>::kTiny, row + cur.lo, &small);
      // No path, NaN, a row entry too small, or the row's max itself below
      // tiny: the next step multiplies this unnormalised row by E before
      // dividing by top, so entries that are tiny relative to a tiny top
      // would give products below the tier's normal range.
      if (!(top >= Tier<calc_t>::kTiny) || !std::isfinite(top) || small) return false;
    }
    log_scale += shifts[t] + std::log(acc_t(top));
    inv_prev = 1 / top;
    prev = row;
    prev_range = cur;
  }
  if (prev == nullptr) {
    *log_z = 0;  // empty chain
    return true;
  }
  acc_t z = 0;
  for (int64_t j = prev_range.lo; j < prev_range.hi; ++j) z += acc_t(prev[j]) * acc_t(c.end_weight[j]);
  *log_z = log_scale + std::log(z * inv_prev) + c.end_max;
  return z > 0 && std::isfinite(*log_z);
}

// Per-sequence shares of the parameter gradients. trans_scaled holds the sum
// of pairwise marginals divided by E[i][j]; the caller multiplies by E once.
struct ScaledGrads {
  acc_t* start;
  acc_t* end;
  acc_t* trans_scaled;
};

// Backward recursion for one chain, from the rows a and weights x that
// scaled_forward wrote. Calls sink(t, marginal, range) at every selected
// position, from the last to the first, with the posterior P(y_t = j) for j in
// range; adds g times the marginals to `grads`. Marginals are normalised per
// position, so the forward scales are never needed. False: not representable
// (the caller redoes the sequence exactly and discards what was added).
// With pair_c and pair_q (T, pair_ld) given, the pairwise marginals of the
// step into position t, divided by g, are left as the factors pair_c[t]
// (outer) pair_q[t], for the caller to sum over the chain in one product
// (tile_gemm_at) and scale by g in double; rows of positions without such
// a step, and columns past K, are not written. Without them (double tier
// only) they are accumulated into grads.trans_scaled here. work: 7K scratch.
template <typename calc_t, typename Sink>
bool scaled_backward(const ScaledChain<calc_t>& c, const bool* mask, const int64_t* tags, int64_t T,
                     const calc_t* a, const calc_t* x, acc_t g, ScaledGrads grads, calc_t* work, const Sink& sink,
                     calc_t* pair_c = nullptr, calc_t* pair_q = nullptr, int64_t pair_ld = 0) {
  const Transitions& tr = c.tr;
  const int64_t K = tr.K;
  calc_t* b = work;               // backward variables at t, max 1
  calc_t* b_prev = work + K;      // at the previous selected position
  calc_t* marg = work + 2 * K;
  calc_t* marg_prev = work + 3 * K;
  calc_t* r = work + 4 * K;
  calc_t* q = work + 5 * K;       // x_t * b_t
  calc_t* coef = work + 6 * K;
  // The factor backward_step folds into coef: g itself only when this
  // function adds the pairwise marginals (and then in double).
  const calc_t coef_g = pair_c != nullptr ? calc_t(1) : calc_t(g);
  int64_t t = T - 1;
  while (t >= 0 && !mask[t]) --t;
  if (t < 0) return true;
  StateRange cur = allowed_states(tags, t, K);
  const calc_t* at = a + t * K;
  calc_t n = 0;
  for (int64_t j = cur.lo; j < cur.hi; ++j) n += at[j] * c.end_weight[j];
  if (!(n > 0)) return false;
  for (int64_t j = cur.lo; j < cur.hi; ++j) {
    b[j] = c.end_weight[j];
    marg[j] = at[j] * b[j] / n;
    grads.end[j] += g * marg[j];
  }
  while (true) {
    sink(t, marg, cur);
    int64_t tp = t - 1;
    while (tp >= 0 && !mask[tp]) --tp;
    if (tp < 0) {
      for (int64_t j = cur.lo; j < cur.hi; ++j) grads.start[j] += g * marg[j];
      return true;
    }
    const StateRange prev = allowed_states(tags, tp, K);
    const calc_t* xt = x + t * K;
    if (pair_q != nullptr) q = pair_q + t * pair_ld;  // the free chain: every state allowed
    for (int64_t j = cur.lo; j < cur.hi; ++j) q[j] = xt[j] * b[j];
    // r[i] = sum_j E[i][j] q[j], streaming rows of E transposed.
    vecmat(cur.size(), prev.size(), q + cur.lo, c.scaled_t.data() + cur.lo * K + prev.lo, K, r + prev.lo);
    int64_t small = 0;
    if (pair_c != nullptr) coef = pair_c + t * pair_ld;
    const calc_t norm = backward_step(prev.size(), r + prev.lo, a + tp * K + prev.lo, coef_g, Tier<calc_t>::kTiny,
                                      b_prev + prev.lo, marg_prev + prev.lo, coef + prev.lo, &small);
    if (!(norm > 0) || small) return false;
    // P(i, j) = coef[i] E[i][j] q[j] / coef_g; E is applied by the caller.
    if (pair_c == nullptr) {
      if constexpr (std::is_same_v<calc_t, acc_t>)
        outer_accumulate(prev.size(), cur.size(), coef + prev.lo, q + cur.lo, K,
                         grads.trans_scaled + prev.lo * K + cur.lo);
      else
        TORCH_INTERNAL_ASSERT(false, "the float tier leaves its pairwise factors to the caller");
    }
    std::swap(b, b_prev);
    std::swap(marg, marg_prev);
    t = tp;
    cur = prev;
  }
}

// Tags index the emissions, so a bad one is refused before any kernel reads
// it; the message is the one fastnlp.ops reports for the same mistake.
void check_likelihood_tags(const at::Tensor& tags, const at::Tensor& mask, int64_t K, int64_t ignore_index) {
  const int64_t B = mask.size(0), T = mask.size(1);
  const int64_t* tag = tags.data_ptr<int64_t>();
  const bool* selected = mask.data_ptr<bool>();
  for (int64_t x = 0; x < B * T; ++x) {
    if (!selected[x] || tag[x] == ignore_index || (tag[x] >= 0 && tag[x] < K)) continue;
    TORCH_CHECK_INDEX(false, "tags must be in [0, ", K, ") or equal ignore_index (", ignore_index,
                      ") at the positions the mask selects; got ", tag[x], " at batch ", x / T, ", position ",
                      x % T);
  }
}

at::Tensor checked_likelihood_tags(const at::Tensor& tags, const at::Tensor& mask, int64_t K, int64_t ignore_index) {
  TORCH_CHECK(tags.scalar_type() == at::kLong, "tags must be int64, got ", tags.scalar_type());
  TORCH_CHECK(tags.device().is_cpu(), "fastnlp CPU kernel got tags on ", tags.device());
  TORCH_CHECK(tags.sizes() == mask.sizes(), "tags must be shaped like mask ", mask.sizes(), ", got ", tags.sizes());
  at::Tensor t = tags.contiguous();
  check_likelihood_tags(t, mask, K, ignore_index);
  return t;
}

// The free chain's scratch in one tier: the backward recursion's work rows,
// its pairwise factors (T, pair_ld) (zero-initialised; the padding columns
// are never written) and their sum (pair_rows, pair_ld), padded as
// tile_gemm_at wants. Sized on first use.
template <typename calc_t>
struct FreeChainScratch {
  std::vector<calc_t> work, pair_c, pair_q, pair_sum;
  int64_t pair_ld = 0;    // K rounded up to two vectors
  int64_t pair_rows = 0;  // K rounded up to tile_gemm's rows

  void size_for(int64_t T, int64_t K) {
    if (!work.empty()) return;
    constexpr int64_t cols = 2 * Simd<calc_t>::W, rows = tile_detail::kRows;
    pair_ld = (K + cols - 1) / cols * cols;
    pair_rows = (K + rows - 1) / rows * rows;
    work.resize(7 * K);
    pair_c.assign(T * pair_ld, calc_t(0));
    pair_q.assign(T * pair_ld, calc_t(0));
    pair_sum.resize(pair_rows * pair_ld);
  }
};

// Per-thread scratch of the fused op; the (T, K) buffers are only sized when a
// sequence needs them (partial tags, the double tier of a float32 sequence,
// or the exact fallback).
struct LikelihoodScratch {
  std::vector<acc_t> work, shifts;
  std::vector<int64_t> mapped;
  std::vector<acc_t> scores, chain_a, chain_b, grad_a, grad_b, wide_rows;
  FreeChainScratch<float> narrow;
  FreeChainScratch<double> wide;
  acc_t* sized(std::vector<acc_t>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }
  template <typename calc_t>
  FreeChainScratch<calc_t>& free_chain() {
    if constexpr (std::is_same_v<calc_t, float>)
      return narrow;
    else
      return wide;
  }
};

// The free chain's part of one sequence's gradient, from its scaled forward
// rows a and weights x in calc_t: sink(t, marginal) at every selected
// position, with the posterior marginals the chain's gradient is -g times;
// -g times the start, end and pairwise marginals into grads; zero rows of
// grad_emissions at unselected positions. False: not representable (what was
// added to grads is unusable).
template <typename calc_t, typename scalar_t, typename Sink>
bool free_chain_gradient(const ScaledChain<calc_t>& c, const bool* m, int64_t T, const calc_t* a, const calc_t* x,
                         acc_t g, ScaledGrads grads, FreeChainScratch<calc_t>& s, scalar_t* grad_emissions,
                         const Sink& sink) {
  const int64_t K = c.tr.K;
  s.size_for(T, K);
  calc_t* pc = s.pair_c.data();
  calc_t* pq = s.pair_q.data();
  const int64_t ld = s.pair_ld;
  const bool ok = scaled_backward(
      c, m, nullptr, T, a, x, -g, grads, s.work.data(),
      [&](int64_t t, const calc_t* marg, StateRange) { sink(t, marg); }, pc, pq, ld);
  if (!ok) return false;
  // Rows the recursion did not write: masked positions have no marginal, and
  // no pairwise step ends at them or at the first selected one. The pairwise
  // sums cover the rows after it.
  int64_t first = -1, last = -1;
  for (int64_t t = 0; t < T; ++t) {
    if (m[t]) {
      last = t, first = first < 0 ? t : first;
      continue;
    }
    std::fill(grad_emissions + t * K, grad_emissions + (t + 1) * K, scalar_t(0));
    std::fill(pc + t * ld, pc + (t + 1) * ld, calc_t(0));
    std::fill(pq + t * ld, pq + (t + 1) * ld, calc_t(0));
  }
  // sum_t pc[t]^T pq[t] over the steps, as one product per chunk of
  // kGramChunk steps, each chunk's sum added in double: a float sum over
  // thousands of steps would lose digits. (The padded rows and columns of
  // the sum are not used.)
  constexpr int64_t kGramChunk = 64;
  calc_t* pair_sum = s.pair_sum.data();
  for (int64_t t0 = first + 1; first >= 0 && t0 <= last; t0 += kGramChunk) {
    const int64_t steps = std::min(kGramChunk, last + 1 - t0);
    tile_gemm_at(s.pair_rows, ld, steps, pc + t0 * ld, ld, pq + t0 * ld, ld, pair_sum, ld, false);
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) grads.trans_scaled[i * K + j] += -g * acc_t(pair_sum[i * ld + j]);
  }
  return true;
}

// The scaled chains of one fused-likelihood call: the double one (pinned
// chains, and float32 sequences whose scores do not fit float) and, for
// float32 emissions only, the float one. own() is the emissions' tier.
template <typename scalar_t>
struct LikelihoodChains {
  ScaledChain<acc_t> wide;
  std::optional<ScaledChain<float>> narrow;

  explicit LikelihoodChains(const Transitions& tr) : wide(tr) {
    if constexpr (std::is_same_v<scalar_t, float>) narrow.emplace(tr);
  }
  const ScaledChain<scalar_t>& own() const {
    if constexpr (std::is_same_v<scalar_t, float>)
      return *narrow;
    else
      return wide;
  }
};

// Where scaled_forward may put the log-weights: in place in the weights x in
// the double tier; the float tier needs a double scratch instead.
inline acc_t* in_place_scores(double* x) { return x; }
inline acc_t* in_place_scores(float*) { return nullptr; }

// The saved forward state: per sequence, the free chain's scaled forward rows
// and emission weights (2, T, K), in the emissions' type (float32 or float64:
// the tier the backward pass runs in), and whether the backward pass must
// recompute the sequence instead (`exact`: the rows did not fit that tier).
std::tuple<at::Tensor, at::Tensor, at::Tensor> crf_log_likelihood_cpu(
    const at::Tensor& emissions_in, const at::Tensor& mask_in, const at::Tensor& tags_in, const at::Tensor& start_in,
    const at::Tensor& end_in, const at::Tensor& trans_in, int64_t ignore_index) {
  check_inputs(emissions_in, mask_in, start_in, end_in, trans_in);
  const at::Tensor emissions = emissions_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor start = start_in.contiguous(), end = end_in.contiguous(), trans = trans_in.contiguous();
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  const at::Tensor tags = checked_likelihood_tags(tags_in, mask, K, ignore_index);
  at::Tensor llh = at::empty({B}, emissions.options());
  at::Tensor alpha = at::empty({B, 2, T, K}, emissions.options());
  at::Tensor exact = at::empty({B}, emissions.options().dtype(at::kBool));
  if (B == 0) return {llh, alpha, exact};
  AT_DISPATCH_FLOATING_TYPES(emissions.scalar_type(), "crf_log_likelihood_cpu", [&] {
    constexpr bool narrow_tier = !std::is_same_v<scalar_t, acc_t>;
    const Transitions tr = make_transitions<scalar_t>(start, end, trans);
    const LikelihoodChains<scalar_t> chains(tr);
    const ScaledChain<scalar_t>& chain = chains.own();
    const ScaledChain<acc_t>& wide = chains.wide;
    const scalar_t* em = emissions.data_ptr<scalar_t>();
    const bool* mk = mask.data_ptr<bool>();
    const int64_t* tg = tags.data_ptr<int64_t>();
    scalar_t* out = llh.data_ptr<scalar_t>();
    scalar_t* state = alpha.data_ptr<scalar_t>();
    bool* ex = exact.data_ptr<bool>();
    for_each_sequence(
        B,
        [&] {
          LikelihoodScratch s;
          s.work.resize(6 * K);
          s.shifts.resize(T);
          s.mapped.resize(T);
          return s;
        },
        [&](int64_t b, LikelihoodScratch& s) {
          const scalar_t* e = em + b * T * K;
          const bool* m = mk + b * T;
          int64_t* mapped = s.mapped.data();
          const bool partial = map_tags(tg + b * T, m, T, ignore_index, mapped);
          scalar_t* a = state + b * 2 * T * K;
          scalar_t* x = a + T * K;
          if (tr.invalid || invalid_emissions(e, m, T, K)) {
            std::fill(a, a + 2 * T * K, scalar_t(0));  // not used: the backward pass rescans
            ex[b] = true;
            out[b] = static_cast<scalar_t>(kNaN);
            return;
          }
          acc_t log_z = 0, gold = 0;
          acc_t* scores = narrow_tier ? s.sized(s.scores, T * K) : in_place_scores(x);
          const bool saved = chain.representable && scaled_forward(chain, e, m, nullptr, T, a, x, &log_z,
                                                                  s.shifts.data(), scores);
          bool scaled = saved;
          if (!saved && narrow_tier && wide.representable) {
            // Scores too far apart for float: the double tier, whose rows
            // the backward pass recomputes.
            acc_t* wa = s.sized(s.wide_rows, 2 * T * K);
            scaled = scaled_forward(wide, e, m, nullptr, T, wa, wa + T * K, &log_z, s.shifts.data(), wa + T * K);
          }
          if (scaled) {
            if (partial) {
              acc_t* pa = s.sized(s.chain_a, 2 * T * K);
              const bool ok = scaled_forward(wide, e, m, mapped, T, pa, pa + T * K, &gold, s.shifts.data(),
                                             pa + T * K);
              // A tagging that no path agrees with is -inf, as in the exact path.
              if (!ok) gold = forward_sequence(tr, e, m, mapped, T, s.sized(s.chain_a, T * K), s.work.data());
            } else {
              gold = gold_path_score(tr, e, m, mapped, T);
            }
          } else {
            log_z = forward_sequence(tr, e, m, nullptr, T, s.sized(s.chain_a, T * K), s.work.data());
            gold = forward_sequence(tr, e, m, mapped, T, s.sized(s.chain_a, T * K), s.work.data());
          }
          if (!saved) std::fill(a, a + 2 * T * K, scalar_t(0));  // not used: the backward pass recomputes
          ex[b] = !saved;
          out[b] = static_cast<scalar_t>(gold - log_z);
        });
  });
  return {llh, alpha, exact};
}

// The exact log-space path for one sequence, for the gradients: the chain's
// forward, then its backward algorithm scaled by g, into grad (T, K).
template <typename scalar_t>
void exact_chain_gradient(const Transitions& tr, const scalar_t* e, const bool* m, const int64_t* tags, int64_t T,
                          acc_t g, LikelihoodScratch& s, acc_t* grad, ParamGrads grads) {
  const int64_t K = tr.K;
  acc_t* alpha = s.sized(s.chain_b, T * K);
  const acc_t log_z = forward_sequence(tr, e, m, tags, T, alpha, s.work.data());
  backward_sequence(tr, e, m, tags, T, alpha, log_z, g, grad, grads, s.work.data());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> crf_log_likelihood_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& emissions_in, const at::Tensor& mask_in, const at::Tensor& tags_in,
    const at::Tensor& start_in, const at::Tensor& end_in, const at::Tensor& trans_in, int64_t ignore_index,
    const at::Tensor& alpha_in, const at::Tensor& exact_in) {
  check_inputs(emissions_in, mask_in, start_in, end_in, trans_in);
  const at::Tensor emissions = emissions_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor start = start_in.contiguous(), end = end_in.contiguous(), trans = trans_in.contiguous();
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  TORCH_CHECK(alpha_in.dim() == 4 && alpha_in.size(0) == B && alpha_in.size(1) == 2 && alpha_in.size(2) == T &&
                  alpha_in.size(3) == K && alpha_in.scalar_type() == emissions.scalar_type(),
              "alpha must be ", emissions.scalar_type(), " of shape (", B, ", 2, ", T, ", ", K, "), got ",
              alpha_in.scalar_type(), " ", alpha_in.sizes());
  TORCH_CHECK(exact_in.dim() == 1 && exact_in.size(0) == B && exact_in.scalar_type() == at::kBool,
              "exact must be bool of shape (", B, "), got ", exact_in.scalar_type(), " ", exact_in.sizes());
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) == B, "grad_log_likelihood must be (", B, "), got ",
              grad_in.sizes());
  const at::Tensor tags = checked_likelihood_tags(tags_in, mask, K, ignore_index);
  const at::Tensor alpha = alpha_in.contiguous(), exact = exact_in.contiguous();
  const at::Tensor grad = grad_in.to(emissions.scalar_type()).contiguous();
  at::Tensor grad_emissions = at::empty_like(emissions);  // every element written below
  at::Tensor grad_start = at::empty({K}, emissions.options());
  at::Tensor grad_end = at::empty({K}, emissions.options());
  at::Tensor grad_trans = at::empty({K, K}, emissions.options());
  AT_DISPATCH_FLOATING_TYPES(emissions.scalar_type(), "crf_log_likelihood_backward_cpu", [&] {
    constexpr bool narrow_tier = !std::is_same_v<scalar_t, acc_t>;
    const Transitions tr = make_transitions<scalar_t>(start, end, trans);
    const LikelihoodChains<scalar_t> chains(tr);
    const ScaledChain<scalar_t>& chain = chains.own();
    const ScaledChain<acc_t>& wide = chains.wide;
    const scalar_t* em = emissions.data_ptr<scalar_t>();
    const bool* mk = mask.data_ptr<bool>();
    const int64_t* tg = tags.data_ptr<int64_t>();
    const scalar_t* state = alpha.data_ptr<scalar_t>();
    const bool* ex = exact.data_ptr<bool>();
    const scalar_t* gr = grad.data_ptr<scalar_t>();
    scalar_t* ge_all = grad_emissions.data_ptr<scalar_t>();
    // Per sequence: start (K), end (K), pairwise marginals / E (K, K), and
    // (only for sequences on the exact path) pairwise marginals themselves
    // (K, K). Summed in batch order afterwards, so the result does not depend
    // on which thread ran which sequence.
    const int64_t slot = 2 * K + K * K;
    std::unique_ptr<acc_t[]> per_sequence(new acc_t[B * slot]);
    std::vector<std::vector<acc_t>> exact_trans(B);
    for_each_sequence(
        B,
        [&] {
          LikelihoodScratch s;
          s.work.resize(10 * K);
          s.shifts.resize(T);
          s.mapped.resize(T);
          return s;
        },
        [&](int64_t b, LikelihoodScratch& s) {
          const scalar_t* e = em + b * T * K;
          const bool* m = mk + b * T;
          const acc_t g = gr[b];
          scalar_t* ge = ge_all + b * T * K;
          acc_t* mine = per_sequence.get() + b * slot;
          if (tr.invalid || invalid_emissions(e, m, T, K)) {
            // exact_trans holds this sequence's pairwise marginals: NaN, like the rest.
            exact_trans[b].assign(K * K, kNaN);
            invalid_sequence_gradient(m, T, K, ge, ParamGrads{mine, mine + K, mine + 2 * K});
            return;
          }
          const ScaledGrads grads{mine, mine + K, mine + 2 * K};
          int64_t* mapped = s.mapped.data();
          const bool partial = map_tags(tg + b * T, m, T, ignore_index, mapped);
          bool gold_counts = false;  // add g at the gold path's states and transitions

          // One try at the whole sequence with the free chain's rows a, x in
          // calc_t: the gold side (pinned marginals times g, or for a fully
          // tagged sequence the indicator of its path, applied in the sink),
          // then the free side, -g times the marginals. False: the free
          // chain does not fit calc_t; nothing written is usable.
          auto scaled_sequence = [&](const auto& c, const auto* a, const auto* x) -> bool {
            using calc_t = std::remove_cv_t<std::remove_pointer_t<decltype(a)>>;
            std::fill(mine, mine + slot, acc_t(0));
            exact_trans[b].clear();
            const acc_t* pinned = nullptr;
            gold_counts = false;
            if (partial) {
              acc_t* pa = s.sized(s.chain_a, 2 * T * K);
              acc_t* pg = s.sized(s.grad_a, T * K);
              acc_t gold = 0;
              bool ok = scaled_forward(wide, e, m, mapped, T, pa, pa + T * K, &gold, s.shifts.data(), pa + T * K);
              if (ok) {
                std::fill(pg, pg + T * K, acc_t(0));
                ok = scaled_backward(wide, m, mapped, T, pa, pa + T * K, g, grads, s.work.data(),
                                     [&](int64_t t, const acc_t* marg, StateRange r) {
                                       for (int64_t j = r.lo; j < r.hi; ++j) pg[t * K + j] = g * marg[j];
                                     });
              }
              if (!ok) {
                std::fill(mine, mine + slot, acc_t(0));
                auto& direct = exact_trans[b];
                direct.assign(K * K, acc_t(0));
                exact_chain_gradient(tr, e, m, mapped, T, g, s, pg, ParamGrads{mine, mine + K, direct.data()});
              }
              pinned = pg;
            } else {
              gold_counts = std::isfinite(gold_path_score(tr, e, m, mapped, T));
            }
            return free_chain_gradient(c, m, T, a, x, g, grads, s.free_chain<calc_t>(), ge,
                                       [&](int64_t t, const calc_t* marg) {
                                         scalar_t* row = ge + t * K;
                                         if (pinned != nullptr) {
                                           const acc_t* p = pinned + t * K;
                                           for (int64_t j = 0; j < K; ++j)
                                             row[j] = static_cast<scalar_t>(p[j] - g * marg[j]);
                                         } else {
                                           for (int64_t j = 0; j < K; ++j)
                                             row[j] = static_cast<scalar_t>(-g * marg[j]);
                                           if (gold_counts) {
                                             const int64_t y = mapped[t];
                                             row[y] = static_cast<scalar_t>(g - g * marg[y]);
                                           }
                                         }
                                       });
          };

          // The saved rows in the emissions' tier; for float32 rows that were
          // not saved (or whose backward does not fit float), the double tier
          // recomputed; else the exact log-space path.
          const scalar_t* a = state + b * 2 * T * K;
          bool ok = !ex[b] && scaled_sequence(chain, a, a + T * K);
          if (!ok && narrow_tier && wide.representable) {
            acc_t* wa = s.sized(s.wide_rows, 2 * T * K);
            acc_t log_z = 0;
            ok = scaled_forward(wide, e, m, nullptr, T, wa, wa + T * K, &log_z, s.shifts.data(), wa + T * K) &&
                 scaled_sequence(wide, static_cast<const acc_t*>(wa), static_cast<const acc_t*>(wa + T * K));
          }
          if (!ok) {
            // Redo the whole sequence exactly (the gold side's shares included).
            std::fill(mine, mine + slot, acc_t(0));
            auto& direct = exact_trans[b];
            direct.assign(K * K, acc_t(0));
            const ParamGrads exact_grads{mine, mine + K, direct.data()};
            acc_t* free_grad = s.sized(s.grad_b, T * K);
            exact_chain_gradient(tr, e, m, nullptr, T, -g, s, free_grad, exact_grads);
            acc_t* gold_grad = s.sized(s.grad_a, T * K);
            exact_chain_gradient(tr, e, m, mapped, T, g, s, gold_grad, exact_grads);
            for (int64_t x = 0; x < T * K; ++x) ge[x] = static_cast<scalar_t>(gold_grad[x] + free_grad[x]);
            gold_counts = false;
          }
          if (gold_counts) {
            // The gold path's start and end (its transitions are added below, in batch order).
            int64_t first = -1, last = -1;
            for (int64_t t = 0; t < T; ++t)
              if (m[t]) last = t, first = first < 0 ? t : first;
            if (first >= 0) {
              mine[mapped[first]] += g;
              mine[K + mapped[last]] += g;
            }
          }
        });
    // Gold transition counts of the fully tagged, scaled sequences, then the sums.
    std::vector<acc_t> counts(K * K, 0.0), total(slot, 0.0);
    std::vector<int64_t> mapped(T);
    for (int64_t b = 0; b < B; ++b) {
      const acc_t* mine = per_sequence.get() + b * slot;
      for (int64_t x = 0; x < slot; ++x) total[x] += mine[x];
      if (!exact_trans[b].empty()) {
        for (int64_t x = 0; x < K * K; ++x) counts[x] += exact_trans[b][x];
        continue;
      }
      const bool* m = mk + b * T;
      if (map_tags(tg + b * T, m, T, ignore_index, mapped.data())) continue;
      if (!std::isfinite(gold_path_score(tr, em + b * T * K, m, mapped.data(), T))) continue;
      int64_t prev = -1;
      for (int64_t t = 0; t < T; ++t) {
        if (!m[t]) continue;
        if (prev >= 0) counts[prev * K + mapped[t]] += gr[b];
        prev = mapped[t];
      }
    }
    scalar_t* gs = grad_start.data_ptr<scalar_t>();
    scalar_t* gn = grad_end.data_ptr<scalar_t>();
    scalar_t* gt = grad_trans.data_ptr<scalar_t>();
    for (int64_t j = 0; j < K; ++j) gs[j] = static_cast<scalar_t>(total[j]), gn[j] = static_cast<scalar_t>(total[K + j]);
    // E = 0 (a forbidden transition) has no pairwise marginal, whatever its factor.
    for (int64_t x = 0; x < K * K; ++x) {
      const acc_t scaled = tr.scaled[x] == 0 ? acc_t(0) : tr.scaled[x] * total[2 * K + x];
      gt[x] = static_cast<scalar_t>(scaled + counts[x]);
    }
  });
  return {grad_emissions, grad_start, grad_end, grad_trans};
}

std::tuple<at::Tensor, at::Tensor> crf_viterbi_cpu(const at::Tensor& emissions_in, const at::Tensor& mask_in,
                                                   const at::Tensor& start_in, const at::Tensor& end_in,
                                                   const at::Tensor& trans_in) {
  check_inputs(emissions_in, mask_in, start_in, end_in, trans_in);
  const at::Tensor emissions = emissions_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor start = start_in.contiguous(), end = end_in.contiguous(), trans = trans_in.contiguous();
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  at::Tensor paths = at::empty({B, T}, emissions.options().dtype(at::kLong));
  at::Tensor scores = at::empty({B}, emissions.options());
  AT_DISPATCH_FLOATING_TYPES(emissions.scalar_type(), "crf_viterbi_cpu", [&] {
    const auto tr = raw_transitions<scalar_t>(start, end, trans);
    const bool params_invalid = invalid_parameters(tr.start, tr.end, tr.trans, K);
    const scalar_t* em = emissions.data_ptr<scalar_t>();
    const bool* mk = mask.data_ptr<bool>();
    int64_t* pa = paths.data_ptr<int64_t>();
    scalar_t* sc = scores.data_ptr<scalar_t>();
    struct Scratch {
      std::vector<scalar_t> work;
      std::vector<int32_t> backpointers;
    };
    for_each_sequence(
        B, [&] { return Scratch{std::vector<scalar_t>(2 * K), std::vector<int32_t>(T * K)}; },
        [&](int64_t b, Scratch& s) {
          const bool invalid = params_invalid || invalid_emissions(em + b * T * K, mk + b * T, T, K);
          sc[b] = viterbi_sequence(tr, em + b * T * K, mk + b * T, T, pa + b * T, s.backpointers.data(),
                                   s.work.data(), invalid);
          if (invalid) sc[b] = std::numeric_limits<scalar_t>::quiet_NaN();
        });
  });
  return {paths, scores};
}

std::tuple<at::Tensor, at::Tensor> crf_viterbi_topk_cpu(const at::Tensor& emissions_in, const at::Tensor& mask_in,
                                                        const at::Tensor& start_in, const at::Tensor& end_in,
                                                        const at::Tensor& trans_in, int64_t k) {
  check_inputs(emissions_in, mask_in, start_in, end_in, trans_in);
  TORCH_CHECK(k >= 1, "k must be at least 1, got ", k);
  const at::Tensor emissions = emissions_in.contiguous(), mask = mask_in.contiguous();
  const at::Tensor start = start_in.contiguous(), end = end_in.contiguous(), trans = trans_in.contiguous();
  const int64_t B = emissions.size(0), T = emissions.size(1), K = emissions.size(2);
  at::Tensor paths = at::empty({B, T, k}, emissions.options().dtype(at::kLong));
  at::Tensor scores = at::empty({B, k}, emissions.options());
  AT_DISPATCH_FLOATING_TYPES(emissions.scalar_type(), "crf_viterbi_topk_cpu", [&] {
    const auto tr = raw_transitions<scalar_t>(start, end, trans);
    const bool params_invalid = invalid_parameters(tr.start, tr.end, tr.trans, K);
    const scalar_t* em = emissions.data_ptr<scalar_t>();
    const bool* mk = mask.data_ptr<bool>();
    int64_t* pa = paths.data_ptr<int64_t>();
    scalar_t* sc = scores.data_ptr<scalar_t>();
    for_each_sequence(
        B,
        [&] {
          TopkScratch<scalar_t> s;
          s.score.resize(K * k);
          s.next.resize(K * k);
          s.count.resize(K);
          s.next_count.resize(K);
          s.bp_tag.resize(T * K * k);
          s.bp_rank.resize(T * K * k);
          s.head.resize(K);
          return s;
        },
        [&](int64_t b, TopkScratch<scalar_t>& s) {
          topk_sequence(tr, em + b * T * K, mk + b * T, T, k, pa + b * T * k, sc + b * k, s);
          if (params_invalid || invalid_emissions(em + b * T * K, mk + b * T, T, K))
            std::fill(sc + b * k, sc + (b + 1) * k, std::numeric_limits<scalar_t>::quiet_NaN());
        });
  });
  return {paths, scores};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnlp, CPU, m) {
  m.impl("crf_log_partition", &crf_log_partition_cpu);
  m.impl("crf_log_partition_backward", &crf_log_partition_backward_cpu);
  m.impl("crf_log_likelihood", &crf_log_likelihood_cpu);
  m.impl("crf_log_likelihood_backward", &crf_log_likelihood_backward_cpu);
  m.impl("crf_viterbi", &crf_viterbi_cpu);
  m.impl("crf_viterbi_topk", &crf_viterbi_topk_cpu);
}

}  // namespace fastnlp
