// Fused scaled-dot-product attention on the CPU, flash style.
//
// Forward: for each (batch, head, block of kBlockQ queries) the keys are
// visited in blocks of kBlockK with an online softmax (running row max m and
// sum l, the output accumulator rescaled when m grows), so only the row
// log-sum-exp is stored, never the Lq x Lk matrix. Backward recomputes each
// tile's probabilities from q, k and lse, with delta = rowsum(dO * O).
//
// The speed comes from skipping work: a tile whose keys are all padding, that
// lies above the causal diagonal, or whose attn_mask block is all False (or all
// -inf) is never computed, and a tile that is entirely visible pays for no
// masking at all. The tile products use the register-blocked loop in
// attention_loops.h, in float32 (float64 for float64 inputs); bfloat16 and
// float16 inputs are converted while packing a tile and the result is written
// back in the input dtype.
#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu/attention_loops.h"

namespace fastnlp {
namespace {

// 64 x 64 tiles: the working set of one tile (q, k^T, v, scores) stays in L2
// up to D = 256, and a 64-key granularity is fine enough that padding and the
// causal triangle are skipped almost exactly.
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t ceil_div(int64_t x, int64_t m) { return (x + m - 1) / m; }

template <typename acc_t>
constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

// ---------------------------------------------------------------------------
// Dropout: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as
// 1, 2, 3", 2011), a counter-based generator: the draw for element (b, h, i, j)
// is a pure function of (seed, offset, b * H + h, i, j / 4), so the backward
// pass regenerates exactly the forward's mask without storing it, in any
// order and on any number of threads.

inline void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * ctr[0];
    const uint64_t p1 = uint64_t(0xCD9E8D57u) * ctr[2];
    const uint32_t hi0 = uint32_t(p0 >> 32), lo0 = uint32_t(p0);
    const uint32_t hi1 = uint32_t(p1 >> 32), lo1 = uint32_t(p1);
    ctr[0] = hi1 ^ ctr[1] ^ k0;
    ctr[1] = lo1;
    ctr[2] = hi0 ^ ctr[3] ^ k1;
    ctr[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

struct Dropout {
  bool enabled = false;
  uint32_t k0 = 0, k1 = 0, offset = 0;
  uint32_t threshold = 0;  // keep when the top 24 bits of a draw are >= threshold: P(keep) = 1 - p
  double inv_keep = 1.0;   // 1 / (1 - p), the scale of kept elements

  Dropout(double p, const std::optional<at::Tensor>& rng_state) {
    if (p <= 0) return;
    TORCH_CHECK(p < 1, "dropout_p must be in [0, 1), got ", p);
    TORCH_CHECK(rng_state.has_value(), "dropout_p > 0 needs rng_state (int64 tensor (seed, offset))");
    TORCH_CHECK(rng_state->device().is_cpu() && rng_state->scalar_type() == at::kLong && rng_state->numel() == 2,
                "rng_state must be a CPU int64 tensor of 2 elements (seed, offset), got ",
                rng_state->scalar_type(), " ", rng_state->sizes(), " on ", rng_state->device());
    const at::Tensor state = rng_state->contiguous();
    const uint64_t seed = static_cast<uint64_t>(state.data_ptr<int64_t>()[0]);
    enabled = true;
    k0 = uint32_t(seed);
    k1 = uint32_t(seed >> 32);
    offset = uint32_t(static_cast<uint64_t>(state.data_ptr<int64_t>()[1]));
    threshold = uint32_t(std::min(p * 16777216.0, 16777216.0));
    inv_keep = 1.0 / (1.0 - p);
  }

  // keep[c] for keys j0 + c, c < n, of query row i of head bh; j0 % 4 == 0.
  void row(int64_t bh, int64_t i, int64_t j0, int64_t n, uint8_t* keep) const {
    for (int64_t j = j0; j < j0 + n; j += 4) {
      uint32_t c[4] = {uint32_t(j >> 2), uint32_t(i), uint32_t(bh), offset};
      philox4x32_10(c, k0, k1);
      for (int64_t l = 0; l < 4 && j + l < j0 + n; ++l) keep[j - j0 + l] = (c[l] >> 8) >= threshold;
    }
  }
};

// ---------------------------------------------------------------------------
// Problem description shared by the forward and backward kernels.

template <typename T>
struct Strided4 {
  T* data;
  int64_t s0, s1, s2, s3;
  explicit Strided4(const at::Tensor& t)
      : data(t.data_ptr<std::remove_const_t<T>>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)),
        s3(t.stride(3)) {}
  T* row(int64_t b, int64_t h, int64_t i) const { return data + b * s0 + h * s1 + i * s2; }
};

template <typename scalar_t, typename acc_t>
struct Problem {
  int64_t B, H, Hk, Lq, Lk, D, Dv;
  int64_t group;     // H / Hk query heads share one kv-head
  int64_t Dp, Dvp;   // head dims padded to the product's column block
  acc_t scale;
  bool causal;
  const bool* key_padding = nullptr;  // (B, Lk) contiguous, or null
  // attn_mask (B, H, Lq, Lk) with any strides (0 where broadcast); at most one is set.
  const bool* mask_bool = nullptr;
  const acc_t* mask_add = nullptr;
  int64_t ms0 = 0, ms1 = 0, ms2 = 0, ms3 = 0;
  Dropout dropout;

  Problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* attn_mask,
          const at::Tensor* key_padding_mask, bool is_causal, double dropout_p,
          const std::optional<at::Tensor>& rng_state, double scale_)
      : B(q.size(0)), H(q.size(1)), Hk(k.size(1)), Lq(q.size(2)), Lk(k.size(2)), D(q.size(3)), Dv(v.size(3)),
        group(q.size(1) / k.size(1)), scale(static_cast<acc_t>(scale_)), causal(is_causal),
        dropout(dropout_p, rng_state) {
    constexpr int64_t cols = 2 * Simd<acc_t>::W;
    Dp = round_up(D, cols);
    Dvp = round_up(Dv, cols);
    if (key_padding_mask) key_padding = key_padding_mask->data_ptr<bool>();
    if (attn_mask) {
      if (attn_mask->scalar_type() == at::kBool)
        mask_bool = attn_mask->data_ptr<bool>();
      else
        mask_add = attn_mask->data_ptr<acc_t>();
      ms0 = attn_mask->stride(0), ms1 = attn_mask->stride(1), ms2 = attn_mask->stride(2);
      ms3 = attn_mask->stride(3);
    }
  }
};

// The key-padding row of keys j0.. of batch b, or null without key padding.
template <typename scalar_t, typename acc_t>
const bool* real_keys(const Problem<scalar_t, acc_t>& pb, int64_t b, int64_t j0) {
  return pb.key_padding ? pb.key_padding + b * pb.Lk + j0 : nullptr;
}

// What one (query block, key block) tile needs.
template <typename acc_t>
struct TilePlan {
  // Keys j0 .. j0 + width can be visible (trailing padding keys and keys past
  // the causal diagonal are cut off, so the products skip them too);
  // width_pad rounds it up to the product's column block.
  int64_t width = 0, width_pad = 0;
  bool column_bias = false;  // padding keys or padded columns: bias[c] -inf hides column c
  bool causal = false;       // the diagonal crosses the tile
  bool mask = false;         // attn_mask has both visible and hidden entries here (or adds floats)
};

// Decides whether tile (rows i0..i0+mq, keys j0..j0+nk) of (b, h) can be
// skipped (false), and otherwise its width and which masks must be applied
// element-wise. Fills bias[0..width_pad) when plan.column_bias.
template <typename scalar_t, typename acc_t>
bool plan_tile(const Problem<scalar_t, acc_t>& pb, int64_t b, int64_t h, int64_t i0, int64_t mq, int64_t j0,
               int64_t nk, TilePlan<acc_t>& plan, acc_t* bias) {
  constexpr int64_t cols = 2 * Simd<acc_t>::W;
  plan = TilePlan<acc_t>{};
  int64_t width = nk;
  if (pb.causal) {
    if (j0 > i0 + mq - 1) return false;  // every key is after every query
    width = std::min(width, i0 + mq - j0);
    plan.causal = j0 + width - 1 > i0;
  }
  const bool* kp = real_keys(pb, b, j0);
  int64_t real = width;
  if (kp) {
    while (width > 0 && !kp[width - 1]) --width;
    if (width == 0) return false;
    real = 0;
    for (int64_t c = 0; c < width; ++c) real += kp[c];
  }
  plan.width = width;
  plan.width_pad = round_up(width, cols);
  if (real < plan.width_pad) {
    plan.column_bias = true;
    for (int64_t c = 0; c < plan.width_pad; ++c) bias[c] = c < width && (!kp || kp[c]) ? acc_t(0) : -kInf<acc_t>;
  }
  if (pb.mask_bool || pb.mask_add) {
    // A scan of the mask block costs about as much as masking it once, and
    // saves the whole tile when it finds nothing visible.
    int64_t visible = 0;
    for (int64_t r = 0; r < mq; ++r) {
      const int64_t base = b * pb.ms0 + h * pb.ms1 + (i0 + r) * pb.ms2 + j0 * pb.ms3;
      if (pb.mask_bool) {
        for (int64_t c = 0; c < width; ++c) visible += pb.mask_bool[base + c * pb.ms3];
      } else {
        for (int64_t c = 0; c < width; ++c) visible += pb.mask_add[base + c * pb.ms3] != -kInf<acc_t>;
      }
    }
    if (visible == 0) return false;
    plan.mask = pb.mask_add != nullptr || visible < mq * width;
  }
  return true;
}

// Applies the tile's masks to the scores s[0..width_pad) of query row i.
template <typename scalar_t, typename acc_t>
void mask_row(const Problem<scalar_t, acc_t>& pb, const TilePlan<acc_t>& plan, const acc_t* bias, int64_t b,
              int64_t h, int64_t i, int64_t j0, int64_t width, int64_t width_pad, acc_t* s) {
  // A hidden column is set to -inf, not added -inf: its score is NaN where
  // the query row holds a NaN (even against a zero-packed key), and a row
  // that sees no key must still come out 0, as the reference has it.
  if (plan.column_bias)
    for (int64_t c = 0; c < width_pad; ++c) s[c] = bias[c] == acc_t(0) ? s[c] : bias[c];
  if (plan.causal)
    for (int64_t c = std::max<int64_t>(0, i + 1 - j0); c < width; ++c) s[c] = -kInf<acc_t>;
  if (plan.mask) {
    const int64_t base = b * pb.ms0 + h * pb.ms1 + i * pb.ms2 + j0 * pb.ms3;
    if (pb.mask_bool) {
      const bool* m = pb.mask_bool + base;
      for (int64_t c = 0; c < width; ++c) s[c] = m[c * pb.ms3] ? s[c] : -kInf<acc_t>;
    } else {
      const acc_t* m = pb.mask_add + base;
      for (int64_t c = 0; c < width; ++c) s[c] += m[c * pb.ms3];
    }
  }
}

// Packing: tiles are copied into zero-padded buffers in the accumulation type.
// Zeros in the padding make the padded rows and columns add exactly nothing.

// Padding keys are never read: a key or value tile is packed with `real`
// (the key-padding row of its keys, or null when there is none), and the
// rows of padding keys are packed as zeros. Whatever they hold (NaN from
// uninitialised memory, say) then reaches no score, output or gradient,
// whichever tile it falls in (0 * NaN would be NaN).

// dst[r * ld + d] = src row r, times factor; r < rows real (and real[r], where
// given), the others up to rows_pad zero; d up to cols_pad.
template <typename scalar_t, typename acc_t>
void pack_rows(const Strided4<const scalar_t>& src, int64_t b, int64_t h, int64_t i0, int64_t rows,
               int64_t rows_pad, int64_t cols, int64_t cols_pad, acc_t factor, acc_t* dst, int64_t ld,
               const bool* real = nullptr) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    acc_t* out = dst + r * ld;
    if (r < rows && (real == nullptr || real[r])) {
      const scalar_t* in = src.row(b, h, i0 + r);
      if (src.s3 == 1) {  // the usual layout: a loop the compiler vectorises
        for (int64_t d = 0; d < cols; ++d) out[d] = static_cast<acc_t>(in[d]) * factor;
      } else {
        for (int64_t d = 0; d < cols; ++d) out[d] = static_cast<acc_t>(in[d * src.s3]) * factor;
      }
      std::fill(out + cols, out + cols_pad, acc_t(0));
    } else {
      std::fill(out, out + cols_pad, acc_t(0));
    }
  }
}

// dst[d * ld + r] = src row r element d: the transposed tile (a k^T or v^T
// block), written in 8-row strips so each destination line is filled by
// consecutive stores rather than one element per cache line. Rows past
// `rows`, and those with real[r] false where real is given, are zeros.
template <typename scalar_t, typename acc_t>
void pack_transposed(const Strided4<const scalar_t>& src, int64_t b, int64_t h, int64_t j0, int64_t rows,
                     int64_t rows_pad, int64_t cols, int64_t cols_pad, acc_t* dst, int64_t ld,
                     const bool* real = nullptr) {
  for (int64_t d = cols; d < cols_pad; ++d) std::fill(dst + d * ld, dst + d * ld + rows_pad, acc_t(0));
  for (int64_t d = 0; d < cols; ++d) std::fill(dst + d * ld + rows, dst + d * ld + rows_pad, acc_t(0));
  constexpr int64_t strip = 8;
  static const scalar_t zeros[1] = {scalar_t(0)};
  for (int64_t r0 = 0; r0 < rows; r0 += strip) {
    const int64_t n = std::min(strip, rows - r0);
    const scalar_t* in[strip];
    int64_t step[strip];  // a padding row reads the one zero again and again
    for (int64_t r = 0; r < n; ++r) {
      const bool read = real == nullptr || real[r0 + r];
      in[r] = read ? src.row(b, h, j0 + r0 + r) : zeros;
      step[r] = read ? src.s3 : 0;
    }
    for (int64_t d = 0; d < cols; ++d) {
      acc_t* out = dst + d * ld + r0;
      for (int64_t r = 0; r < n; ++r) out[r] = static_cast<acc_t>(in[r][d * step[r]]);
    }
  }
}

// Runs body(task, scratch) for task < n, scratch being per thread. Tiles cost
// very different amounts (padding and the causal triangle are skipped), so
// tasks are handed out one at a time (dynamic schedule) rather than in fixed
// ranges that would leave a thread idle at the end.
template <typename MakeScratch, typename Body>
void for_each_task(int64_t n, const MakeScratch& make_scratch, const Body& body) {
  if (n <= 0) return;
#ifdef _OPENMP
  const int threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n)));
  std::vector<decltype(make_scratch())> scratch;
  for (int t = 0; t < threads; ++t) scratch.push_back(make_scratch());
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t task = 0; task < n; ++task) body(task, scratch[omp_get_thread_num()]);
#else
  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    auto scratch = make_scratch();
    for (int64_t task = t0; task < t1; ++task) body(task, scratch);
  });
#endif
}

// ---------------------------------------------------------------------------
// Forward.

template <typename acc_t>
struct ForwardScratch {
  // kt and v hold the whole kv-head: v as (Lk_pad x Dvp), kt as one (Dp x kBlockK)
  // panel per key block -- a single (Dp x Lk_pad) matrix would put the rows a
  // product reads 4 KB apart at Lk = 1024, all in the same few L1 sets.
  std::vector<acc_t> q, kt, v, s, o, m, l, alpha, bias;
  std::vector<uint8_t> keep, packed;              // packed[kb]: key block kb of kt and v is filled
  ForwardScratch(int64_t Dp, int64_t Dvp, int64_t Lk_pad, int64_t key_blocks)
      : q(kBlockQ * Dp), kt(Dp * kBlockK * key_blocks), v(Lk_pad * Dvp), s(kBlockQ * kBlockK),
        o(kBlockQ * Dvp), m(kBlockQ), l(kBlockQ), alpha(kBlockQ), bias(kBlockK), keep(kBlockK), packed(key_blocks) {}
};

// Query blocks qb0 .. qb1 of head (b, h). The key and value blocks are packed
// the first time a query block needs them and reused by the next ones, so
// packing costs once per task rather than once per tile.
template <typename scalar_t, typename acc_t>
void forward_blocks(const Problem<scalar_t, acc_t>& pb, const Strided4<const scalar_t>& q,
                    const Strided4<const scalar_t>& k, const Strided4<const scalar_t>& v, scalar_t* out,
                    acc_t* lse, int64_t b, int64_t h, int64_t qb0, int64_t qb1, ForwardScratch<acc_t>& w) {
  constexpr int64_t cols = 2 * Simd<acc_t>::W;
  const int64_t hk = h / pb.group, Dp = pb.Dp, Dvp = pb.Dvp;
  const int64_t key_blocks = ceil_div(pb.Lk, kBlockK);
  std::fill(w.packed.begin(), w.packed.end(), uint8_t(0));
  TilePlan<acc_t> plan;
  for (int64_t qb = qb0; qb < qb1; ++qb) {
    const int64_t i0 = qb * kBlockQ, mq = std::min(kBlockQ, pb.Lq - i0);
    const int64_t mq_pad = round_up(mq, tile_detail::kRows);
    // The scale is folded into q once rather than applied to every score.
    pack_rows(q, b, h, i0, mq, mq_pad, pb.D, Dp, pb.scale, w.q.data(), Dp);
    std::fill(w.o.begin(), w.o.begin() + mq_pad * Dvp, acc_t(0));
    std::fill(w.m.begin(), w.m.end(), -kInf<acc_t>);
    std::fill(w.l.begin(), w.l.end(), acc_t(0));
    for (int64_t kb = 0; kb < key_blocks; ++kb) {
      const int64_t j0 = kb * kBlockK, nk = std::min(kBlockK, pb.Lk - j0), nk_pad = round_up(nk, cols);
      if (!plan_tile(pb, b, h, i0, mq, j0, nk, plan, w.bias.data())) continue;
      const int64_t nw = plan.width, nw_pad = plan.width_pad;
      if (!w.packed[kb]) {
        const bool* real = real_keys(pb, b, j0);
        pack_transposed(k, b, hk, j0, nk, nk_pad, pb.D, Dp, w.kt.data() + kb * Dp * kBlockK, kBlockK, real);
        pack_rows(v, b, hk, j0, nk, nk_pad, pb.Dv, Dvp, acc_t(1), w.v.data() + j0 * Dvp, Dvp, real);
        w.packed[kb] = 1;
      }
      acc_t* S = w.s.data();
      tile_gemm(mq_pad, nw_pad, Dp, w.q.data(), Dp, w.kt.data() + kb * Dp * kBlockK, kBlockK, S, kBlockK, false);
      if (plan.column_bias || plan.causal || plan.mask)
        for (int64_t r = 0; r < mq; ++r)
          mask_row(pb, plan, w.bias.data(), b, h, i0 + r, j0, nw, nw_pad, S + r * kBlockK);
      // The normaliser l counts dropped elements too: dropout acts on the probabilities.
      online_softmax(mq, nw_pad, S, kBlockK, w.m.data(), w.l.data(), w.alpha.data());
      for (int64_t r = 0; r < mq; ++r) {
        if (w.alpha[r] != acc_t(1)) {
          acc_t* o = w.o.data() + r * Dvp;
          const acc_t alpha = w.alpha[r];
          for (int64_t e = 0; e < Dvp; ++e) o[e] *= alpha;
        }
        if (pb.dropout.enabled) {
          acc_t* s = S + r * kBlockK;
          pb.dropout.row(b * pb.H + h, i0 + r, j0, nw, w.keep.data());
          const acc_t inv = static_cast<acc_t>(pb.dropout.inv_keep);
          for (int64_t c = 0; c < nw; ++c) s[c] = w.keep[c] ? s[c] * inv : acc_t(0);
        }
      }
      tile_gemm(mq_pad, Dvp, nw_pad, S, kBlockK, w.v.data() + j0 * Dvp, Dvp, w.o.data(), Dvp, true);
    }
    for (int64_t r = 0; r < mq; ++r) {
      const int64_t row = (b * pb.H + h) * pb.Lq + i0 + r;
      const bool any = !(w.l[r] == acc_t(0));  // l is 0 on a row that saw no key; NaN goes through
      const acc_t inv = any ? acc_t(1) / w.l[r] : acc_t(0);
      scalar_t* dst = out + row * pb.Dv;
      const acc_t* o = w.o.data() + r * Dvp;
      for (int64_t e = 0; e < pb.Dv; ++e) dst[e] = static_cast<scalar_t>(o[e] * inv);
      lse[row] = any ? w.m[r] + std::log(w.l[r]) : -kInf<acc_t>;
    }
  }
}

// ---------------------------------------------------------------------------
// Backward. One task per (batch, kv-head): it owns dK and dV of that kv-head
// and dQ of the query heads that read it, so no two threads ever write the
// same gradient and the summation order is fixed: the result is deterministic.

template <typename acc_t>
struct BackwardScratch {
  std::vector<acc_t> q, dout, dq, dk, dv, delta, lse;  // whole head / kv-head
  std::vector<acc_t> k, kt, vt, s, dp, t, bias;        // one tile (t: the dropped probabilities)
  std::vector<uint8_t> keep;
  BackwardScratch(int64_t Lq_pad, int64_t Lk_pad, int64_t Dp, int64_t Dvp)
      : q(Lq_pad * Dp), dout(Lq_pad * Dvp), dq(Lq_pad * Dp), dk(Lk_pad * Dp), dv(Lk_pad * Dvp), delta(Lq_pad),
        lse(Lq_pad), k(kBlockK * Dp), kt(Dp * kBlockK), vt(Dvp * kBlockK), s(kBlockQ * kBlockK),
        dp(kBlockQ * kBlockK), t(kBlockQ * kBlockK), bias(kBlockK), keep(kBlockQ * kBlockK) {}
};

template <typename scalar_t, typename acc_t>
void backward_kv_head(const Problem<scalar_t, acc_t>& pb, const Strided4<const scalar_t>& q,
                      const Strided4<const scalar_t>& k, const Strided4<const scalar_t>& v,
                      const Strided4<const scalar_t>& out, const Strided4<const scalar_t>& dout,
                      const acc_t* lse_in, scalar_t* dq_out, scalar_t* dk_out, scalar_t* dv_out, int64_t b,
                      int64_t hk, BackwardScratch<acc_t>& w) {
  constexpr int64_t cols = 2 * Simd<acc_t>::W;
  constexpr int64_t rows_step = tile_detail::kRows;
  const int64_t Dp = pb.Dp, Dvp = pb.Dvp, Lq = pb.Lq, Lk = pb.Lk;
  const int64_t Lq_pad = round_up(Lq, rows_step);
  std::fill(w.dk.begin(), w.dk.end(), acc_t(0));
  std::fill(w.dv.begin(), w.dv.end(), acc_t(0));
  TilePlan<acc_t> plan;
  const acc_t inv_keep = static_cast<acc_t>(pb.dropout.inv_keep);
  for (int64_t h = hk * pb.group; h < (hk + 1) * pb.group; ++h) {
    const int64_t bh = b * pb.H + h;
    pack_rows(q, b, h, 0, Lq, Lq_pad, pb.D, Dp, pb.scale, w.q.data(), Dp);
    pack_rows(dout, b, h, 0, Lq, Lq_pad, pb.Dv, Dvp, acc_t(1), w.dout.data(), Dvp);
    for (int64_t i = 0; i < Lq_pad; ++i) {
      acc_t d = 0;
      if (i < Lq) {
        const scalar_t* o = out.row(b, h, i);
        const acc_t* g = w.dout.data() + i * Dvp;
        for (int64_t e = 0; e < pb.Dv; ++e) d += g[e] * static_cast<acc_t>(o[e * out.s3]);
      }
      w.delta[i] = d;
      // A row that saw no key (lse = -inf) must give p = 0, not exp(+inf):
      // +inf makes every exp(s - lse) exactly 0. Padded rows likewise.
      const acc_t l = i < Lq ? lse_in[bh * Lq + i] : -kInf<acc_t>;
      w.lse[i] = l == -kInf<acc_t> ? kInf<acc_t> : l;
    }
    std::fill(w.dq.begin(), w.dq.end(), acc_t(0));
    for (int64_t j0 = 0; j0 < Lk; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, Lk - j0), nk_pad = round_up(nk, cols);
      bool packed = false;
      for (int64_t i0 = 0; i0 < Lq; i0 += kBlockQ) {
        const int64_t mq = std::min(kBlockQ, Lq - i0), mq_pad = round_up(mq, rows_step);
        if (!plan_tile(pb, b, h, i0, mq, j0, nk, plan, w.bias.data())) continue;
      const int64_t nw = plan.width, nw_pad = plan.width_pad;
        if (!packed) {
          const bool* real = real_keys(pb, b, j0);
          pack_rows(k, b, hk, j0, nk, nk_pad, pb.D, Dp, acc_t(1), w.k.data(), Dp, real);
          pack_transposed(k, b, hk, j0, nk, nk_pad, pb.D, Dp, w.kt.data(), kBlockK, real);
          pack_transposed(v, b, hk, j0, nk, nk_pad, pb.Dv, Dvp, w.vt.data(), kBlockK, real);
          packed = true;
        }
        const acc_t* qi = w.q.data() + i0 * Dp;
        const acc_t* gi = w.dout.data() + i0 * Dvp;
        acc_t* P = w.s.data();
        acc_t* dP = w.dp.data();
        acc_t* T = w.t.data();
        // P = exp(q k^T * scale + mask - lse), exactly the forward's probabilities.
        tile_gemm(mq_pad, nw_pad, Dp, qi, Dp, w.kt.data(), kBlockK, P, kBlockK, false);
        if (plan.column_bias || plan.causal || plan.mask)
          for (int64_t r = 0; r < mq; ++r)
            mask_row(pb, plan, w.bias.data(), b, h, i0 + r, j0, nw, nw_pad, P + r * kBlockK);
        exp_rows(mq, nw_pad, P, kBlockK, w.lse.data() + i0);
        std::fill(P + mq * kBlockK, P + mq_pad * kBlockK, acc_t(0));
        if (pb.dropout.enabled)
          for (int64_t r = 0; r < mq; ++r) pb.dropout.row(bh, i0 + r, j0, nw, w.keep.data() + r * kBlockK);
        // dV += P_dropped^T dO.
        const acc_t* P_used = P;
        if (pb.dropout.enabled) {
          for (int64_t r = 0; r < mq; ++r) {
            const uint8_t* keep = w.keep.data() + r * kBlockK;
            for (int64_t c = 0; c < nw_pad; ++c)
              T[r * kBlockK + c] = c < nw && keep[c] ? P[r * kBlockK + c] * inv_keep : acc_t(0);
          }
          std::fill(T + mq * kBlockK, T + mq_pad * kBlockK, acc_t(0));
          P_used = T;
        }
        tile_gemm_at(nw_pad, Dvp, mq_pad, P_used, kBlockK, gi, Dvp, w.dv.data() + j0 * Dvp, Dvp, true);
        // dS = P * (dP_dropped - delta), dP = dO v^T.
        tile_gemm(mq_pad, nw_pad, Dvp, gi, Dvp, w.vt.data(), kBlockK, dP, kBlockK, false);
        for (int64_t r = 0; r < mq_pad; ++r) {
          acc_t* p = P + r * kBlockK;
          const acc_t* g = dP + r * kBlockK;
          const acc_t delta = w.delta[i0 + r];
          if (pb.dropout.enabled && r < mq) {
            const uint8_t* keep = w.keep.data() + r * kBlockK;
            for (int64_t c = 0; c < nw_pad; ++c) p[c] *= (c < nw && keep[c] ? g[c] * inv_keep : acc_t(0)) - delta;
          } else {
            for (int64_t c = 0; c < nw_pad; ++c) p[c] *= g[c] - delta;
          }
        }
        // dQ += dS k (scaled at the end); dK += dS^T (q * scale).
        tile_gemm(mq_pad, Dp, nw_pad, P, kBlockK, w.k.data(), Dp, w.dq.data() + i0 * Dp, Dp, true);
        tile_gemm_at(nw_pad, Dp, mq_pad, P, kBlockK, qi, Dp, w.dk.data() + j0 * Dp, Dp, true);
      }
    }
    for (int64_t i = 0; i < Lq; ++i) {
      scalar_t* dst = dq_out + (bh * Lq + i) * pb.D;
      const acc_t* src = w.dq.data() + i * Dp;
      for (int64_t d = 0; d < pb.D; ++d) dst[d] = static_cast<scalar_t>(src[d] * pb.scale);
    }
  }
  const int64_t bhk = b * pb.Hk + hk;
  // Padding keys' gradients are 0 outright: dS is 0 in their columns, but a
  // NaN in a query row would still make dS^T q NaN there.
  const bool* real = real_keys(pb, b, 0);
  for (int64_t j = 0; j < Lk; ++j) {
    scalar_t* dk = dk_out + (bhk * Lk + j) * pb.D;
    scalar_t* dv = dv_out + (bhk * Lk + j) * pb.Dv;
    const bool read = real == nullptr || real[j];
    for (int64_t d = 0; d < pb.D; ++d) dk[d] = read ? static_cast<scalar_t>(w.dk[j * Dp + d]) : scalar_t(0);
    for (int64_t e = 0; e < pb.Dv; ++e) dv[e] = read ? static_cast<scalar_t>(w.dv[j * Dvp + e]) : scalar_t(0);
  }
}

// ---------------------------------------------------------------------------
// Argument checks (the Python API has already given friendlier messages; these
// guard direct calls of torch.ops.fastnlp.*) and the dispatch.

struct Masks {
  std::optional<at::Tensor> attn_mask, key_padding_mask;
};

Masks checked_masks(const at::Tensor& query, const at::Tensor& key, const std::optional<at::Tensor>& attn_mask,
                    const std::optional<at::Tensor>& key_padding_mask, at::ScalarType acc_type) {
  const int64_t B = query.size(0), H = query.size(1), Lq = query.size(2), Lk = key.size(2);
  Masks masks;
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(m.device().is_cpu(), "fastnlp CPU kernel got attn_mask on ", m.device());
    TORCH_CHECK(m.dim() == 4 && m.size(0) == B && m.size(1) == H && m.size(2) == Lq && m.size(3) == Lk,
                "attn_mask must be expanded to (B, H, Lq, Lk) = (", B, ", ", H, ", ", Lq, ", ", Lk, "), got ",
                m.sizes());
    TORCH_CHECK(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
                "attn_mask must be bool or floating point, got ", m.scalar_type());
    // A float mask of another dtype is converted here; the Python API converts
    // it before expanding, so the conversion never materialises the broadcast.
    masks.attn_mask = m.scalar_type() == at::kBool || m.scalar_type() == acc_type ? m : m.to(acc_type);
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.device().is_cpu(), "fastnlp CPU kernel got key_padding_mask on ", m.device());
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == B && m.size(1) == Lk,
                "key_padding_mask must be bool (B, Lk) = (", B, ", ", Lk, "), got ", m.scalar_type(), " ",
                m.sizes());
    masks.key_padding_mask = m.contiguous();
  }
  return masks;
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->device().is_cpu(), "fastnlp CPU attention kernel got a tensor on ", t->device());
    TORCH_CHECK(t->dim() == 4, "query, key and value must be 4-D (B, H, L, D), got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "query, key and value must share a dtype, got ",
                q.scalar_type(), " and ", t->scalar_type());
  }
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "query must be floating point, got ", q.scalar_type());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0), "batch sizes differ: ", q.sizes(), " ",
              k.sizes(), " ", v.sizes());
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0 && v.size(1) == k.size(1),
              "query heads must be a multiple of key/value heads, got ", q.size(1), " and ", k.size(1), ", ",
              v.size(1));
  TORCH_CHECK(k.size(2) == v.size(2), "key and value lengths differ: ", k.size(2), " and ", v.size(2));
  TORCH_CHECK(k.size(3) == q.size(3), "query and key head dims differ: ", q.size(3), " and ", k.size(3));
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// q, k and v only need a unit stride along the head dim for fast packing, but
// any strides work; a tensor with stride 0 somewhere is fine too.
std::tuple<at::Tensor, at::Tensor> attention_forward_cpu(const at::Tensor& query, const at::Tensor& key,
                                                         const at::Tensor& value,
                                                         const std::optional<at::Tensor>& attn_mask,
                                                         const std::optional<at::Tensor>& key_padding_mask,
                                                         bool is_causal, double dropout_p, double scale,
                                                         const std::optional<at::Tensor>& rng_state) {
  check_qkv(query, key, value);
  const at::ScalarType acc_type = acc_type_of(query.scalar_type());
  const Masks masks = checked_masks(query, key, attn_mask, key_padding_mask, acc_type);
  const int64_t B = query.size(0), H = query.size(1), Lq = query.size(2), Dv = value.size(3);
  at::Tensor out = at::empty({B, H, Lq, Dv}, query.options());
  at::Tensor lse = at::empty({B, H, Lq}, query.options().dtype(acc_type));
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "attention_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Problem<scalar_t, acc_t> pb(query, key, value, masks.attn_mask ? &*masks.attn_mask : nullptr,
                                      masks.key_padding_mask ? &*masks.key_padding_mask : nullptr, is_causal,
                                      dropout_p, rng_state, scale);
    const Strided4<const scalar_t> q(query), k(key), v(value);
    scalar_t* o = out.data_ptr<scalar_t>();
    acc_t* l = lse.data_ptr<acc_t>();
    // Whole heads when there are enough of them to keep every thread busy;
    // otherwise heads are cut into runs of query blocks (each run repacks k, v).
    const int64_t query_blocks = ceil_div(pb.Lq, kBlockQ);
    const int64_t wanted_tasks = 8 * static_cast<int64_t>(at::get_num_threads());
    const int64_t chunks = std::clamp<int64_t>(ceil_div(wanted_tasks, std::max<int64_t>(1, B * H)), 1,
                                               std::max<int64_t>(1, query_blocks));
    const int64_t per_chunk = ceil_div(query_blocks, chunks);
    constexpr int64_t cols = 2 * Simd<acc_t>::W;
    const int64_t Lk_pad = round_up(pb.Lk, cols), key_blocks = ceil_div(pb.Lk, kBlockK);
    for_each_task(
        B * H * chunks, [&] { return ForwardScratch<acc_t>(pb.Dp, pb.Dvp, Lk_pad, key_blocks); },
        [&](int64_t task, ForwardScratch<acc_t>& w) {
          const int64_t chunk = task % chunks, bh = task / chunks;
          const int64_t qb0 = chunk * per_chunk, qb1 = std::min(query_blocks, qb0 + per_chunk);
          if (qb0 < qb1) forward_blocks(pb, q, k, v, o, l, bh / H, bh % H, qb0, qb1, w);
        });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& out, const at::Tensor& lse_in, const std::optional<at::Tensor>& attn_mask,
    const std::optional<at::Tensor>& key_padding_mask, bool is_causal, double dropout_p, double scale,
    const std::optional<at::Tensor>& rng_state) {
  check_qkv(query, key, value);
  const at::ScalarType acc_type = acc_type_of(query.scalar_type());
  const Masks masks = checked_masks(query, key, attn_mask, key_padding_mask, acc_type);
  const int64_t B = query.size(0), H = query.size(1), Hk = key.size(1), Lq = query.size(2);
  const std::vector<int64_t> out_shape = {B, H, Lq, value.size(3)};
  TORCH_CHECK(grad_out.sizes() == out_shape && out.sizes() == out_shape, "grad_out and out must be ",
              at::IntArrayRef(out_shape), ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({B, H, Lq}), "lse must be (B, H, Lq), got ", lse_in.sizes());
  const at::Tensor grad = grad_out.to(query.scalar_type());
  const at::Tensor o = out.to(query.scalar_type());
  const at::Tensor lse = lse_in.to(acc_type).contiguous();
  at::Tensor grad_query = at::empty(query.sizes(), query.options());
  at::Tensor grad_key = at::empty(key.sizes(), key.options());
  at::Tensor grad_value = at::empty(value.sizes(), value.options());
  if (B * Hk == 0) return {grad_query, grad_key, grad_value};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, query.scalar_type(), "attention_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Problem<scalar_t, acc_t> pb(query, key, value, masks.attn_mask ? &*masks.attn_mask : nullptr,
                                      masks.key_padding_mask ? &*masks.key_padding_mask : nullptr, is_causal,
                                      dropout_p, rng_state, scale);
    const Strided4<const scalar_t> q(query), k(key), v(value), os(o), gs(grad);
    const acc_t* l = lse.data_ptr<acc_t>();
    scalar_t* dq = grad_query.data_ptr<scalar_t>();
    scalar_t* dk = grad_key.data_ptr<scalar_t>();
    scalar_t* dv = grad_value.data_ptr<scalar_t>();
    constexpr int64_t cols = 2 * Simd<acc_t>::W;
    const int64_t Lq_pad = round_up(pb.Lq, tile_detail::kRows), Lk_pad = round_up(pb.Lk, cols);
    for_each_task(
        B * Hk, [&] { return BackwardScratch<acc_t>(Lq_pad, Lk_pad, pb.Dp, pb.Dvp); },
        [&](int64_t task, BackwardScratch<acc_t>& w) {
          backward_kv_head(pb, q, k, v, os, gs, l, dq, dk, dv, task / Hk, task % Hk, w);
        });
  });
  return {grad_query, grad_key, grad_value};
}

at::Tensor attention_dropout_mask_cpu(const at::Tensor& query, const at::Tensor& key, double dropout_p,
                                      const at::Tensor& rng_state) {
  TORCH_CHECK(query.dim() == 4 && key.dim() == 4, "query and key must be 4-D, got ", query.sizes(), " and ",
              key.sizes());
  const int64_t B = query.size(0), H = query.size(1), Lq = query.size(2), Lk = key.size(2);
  at::Tensor keep = at::empty({B, H, Lq, Lk}, query.options().dtype(at::kBool));
  const Dropout dropout(dropout_p, rng_state);
  bool* dst = keep.data_ptr<bool>();
  at::parallel_for(0, B * H * Lq, 1, [&](int64_t r0, int64_t r1) {
    std::vector<uint8_t> row(Lk);
    for (int64_t r = r0; r < r1; ++r) {
      if (dropout.enabled)
        dropout.row(r / Lq, r % Lq, 0, Lk, row.data());
      else
        std::fill(row.begin(), row.end(), uint8_t(1));
      for (int64_t j = 0; j < Lk; ++j) dst[r * Lk + j] = row[j] != 0;
    }
  });
  return keep;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnlp, CPU, m) {
  m.impl("attention_forward", &attention_forward_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
  m.impl("attention_dropout_mask", &attention_dropout_mask_cpu);
}

}  // namespace fastnlp
