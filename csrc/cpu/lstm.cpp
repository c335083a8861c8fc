// LSTM on the CPU: the fused pointwise step kernels (gate activations, cell
// update and their gradients, one pass over the gates per step) plugged into
// the device-generic time loop of csrc/lstm.cpp, whose GEMMs run on
// MKL/oneDNN through ATen.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/few_rows_matmul.h"
#include "cpu/gate_panels.h"
#include "cpu/onednn_matmul.h"
#include "cpu/vector_loops.h"
#include "lstm.h"

namespace fastnlp {
namespace {

// Activations in the storage type's arithmetic: float rows get float's
// 8-lane exp (within a few ulp, as torch's own vectorised sigmoid and tanh),
// double rows double's; the layer-norm kernels too, but for their row sums.
__attribute__((always_inline)) inline double sigmoid(double x) { return 1.0 / (1.0 + vmath_detail::exp_one(-x)); }
__attribute__((always_inline)) inline double tanh_(double x) { return 1.0 - 2.0 / (1.0 + vmath_detail::exp_one(2.0 * x)); }
__attribute__((always_inline)) inline float sigmoid(float x) {
  return 1.0f / (1.0f + vmath_detail::exp_one_float(-x));
}
__attribute__((always_inline)) inline float tanh_(float x) {
  return 1.0f - 2.0f / (1.0f + vmath_detail::exp_one_float(2.0f * x));
}

// The arithmetic-only passes of the row kernels are written for a type V that
// is either scalar_t or Simd<scalar_t>::V (vector_loops.h), and run as vectors with
// a scalar tail: GCC's vectoriser gave up on these loops ("no vectype"),
// though it takes the activation passes, which are plain loops over one array.
// (Inlined, so the ABI note GCC gives for passing 32-byte vectors around in
// the baseline-ISA clones concerns no real call; silenced up to the clones.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
template <typename V, typename T>
__attribute__((always_inline)) inline V load(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
template <typename V, typename T>
__attribute__((always_inline)) inline void store(T* p, const V& v) {
  __builtin_memcpy(p, &v, sizeof v);
}
template <typename V>
struct As {
  typedef V type;
};
// body(As<V>(), j) for every unit j < H: vectors, then the scalar tail.
template <typename scalar_t, typename Body>
__attribute__((always_inline)) inline void for_units(int64_t H, const Body& body) {
  int64_t j = 0;
  for (; j + Simd<scalar_t>::W <= H; j += Simd<scalar_t>::W) body(As<typename Simd<scalar_t>::V>(), j);
  for (; j < H; ++j) body(As<scalar_t>(), j);
}

// Pointers of one row (H units) of a step; optional ones are nullptr.
template <typename scalar_t>
struct ForwardRow {
  scalar_t* gates;
  scalar_t* c_state;
  scalar_t* cells;
  scalar_t* h_out;
  scalar_t* h_state;
  const scalar_t* h_prev;  // h_{t-1}, read for zoneout_hidden (before h_state, which may be it, is written)
  const scalar_t* zoneout_cell;
  const scalar_t* zoneout_hidden;
};

template <typename scalar_t>
struct BackwardRow {
  const scalar_t* gates;
  const scalar_t* c_prev;
  const scalar_t* dh_a;
  const scalar_t* dh_b;
  scalar_t* dc_state;
  scalar_t* grad_gates;
  scalar_t* h_tilde;
  const scalar_t* zoneout_cell;
  const scalar_t* zoneout_hidden;
  scalar_t* grad_h_prev;
};

// The first passes of a forward row: the activations, each gate block in a
// loop of its own, then the cell: c_t into c_state and cells, and c~_t (the
// cell before zoneout) into c_new. Each pass vectorises; one loop doing all
// of a unit's work did not. H units, the gate blocks `stride` apart (the
// hidden size: H is less where a call covers part of a row).
template <typename scalar_t, bool kZoneout>
__attribute__((always_inline)) inline void activate_and_update_cell(int64_t H, int64_t stride,
                                                                    const ForwardRow<scalar_t>& r,
                                                                    scalar_t* __restrict c_new) {
  scalar_t* __restrict gi = r.gates;
  scalar_t* __restrict gf = r.gates + stride;
  scalar_t* __restrict gg = r.gates + 2 * stride;
  scalar_t* __restrict go = r.gates + 3 * stride;
  scalar_t* __restrict c_state = r.c_state;
  scalar_t* __restrict cells = r.cells;
  const scalar_t* __restrict zc = r.zoneout_cell;
  for (int64_t j = 0; j < H; ++j) gi[j] = sigmoid(gi[j]);
  for (int64_t j = 0; j < H; ++j) gf[j] = sigmoid(gf[j]);
  for (int64_t j = 0; j < H; ++j) gg[j] = tanh_(gg[j]);
  for (int64_t j = 0; j < H; ++j) go[j] = sigmoid(go[j]);
  for_units<scalar_t>(H, [&](auto as, int64_t j) {
    typedef typename decltype(as)::type V;
    const V c_prev = load<V>(c_state + j);
    const V c_tilde = load<V>(gf + j) * c_prev + load<V>(gi + j) * load<V>(gg + j);
    store(c_new + j, c_tilde);
    V c = c_tilde;
    if (kZoneout) {
      const V z = load<V>(zc + j);
      c = z * c_prev + (scalar_t(1) - z) * c_tilde;
    }
    store(c_state + j, c);
    store(cells + j, c);
  });
}

// The optional parts are template flags, so each variant's loop has no
// branches and vectorises; the caller picks the variant once per row.
template <typename scalar_t, bool kZoneout>
__attribute__((always_inline)) inline void forward_row_impl(int64_t H, int64_t stride, const ForwardRow<scalar_t>& r) {
  const scalar_t* go = r.gates + 3 * stride;  // not restrict: activate_and_update_cell writes it
  scalar_t* __restrict h_out = r.h_out;
  const scalar_t* __restrict zh = r.zoneout_hidden;
  const scalar_t* h_prev = r.h_prev;
  activate_and_update_cell<scalar_t, kZoneout>(H, stride, r, h_out);  // c~_t kept in h_out until the next pass
  for (int64_t j = 0; j < H; ++j) h_out[j] = go[j] * tanh_(h_out[j]);
  if (kZoneout && zh != nullptr)
    for (int64_t j = 0; j < H; ++j) h_out[j] = zh[j] * h_prev[j] + (scalar_t(1) - zh[j]) * h_out[j];
  if (r.h_state != nullptr)
    for (int64_t j = 0; j < H; ++j) r.h_state[j] = h_out[j];
}

template <typename scalar_t, bool kTwoGradSources, bool kWriteTilde, bool kZoneout>
__attribute__((always_inline)) inline void backward_row_impl(int64_t H, int64_t stride,
                                                       const BackwardRow<scalar_t>& r) {
  const scalar_t* __restrict gates = r.gates;
  const scalar_t* __restrict c_prev = r.c_prev;
  const scalar_t* __restrict dh_a = r.dh_a;
  const scalar_t* __restrict dh_b = r.dh_b;
  scalar_t* __restrict dc_state = r.dc_state;
  scalar_t* __restrict grad_gates = r.grad_gates;
  scalar_t* __restrict h_tilde = r.h_tilde;
  const scalar_t* __restrict zc = r.zoneout_cell;
  const scalar_t* __restrict zh = r.zoneout_hidden;
  scalar_t* __restrict grad_h_prev = r.grad_h_prev;
  // c~_t, recomputed rather than stored, first: parked in the o gate's slot
  // of grad_gates until the second pass reads it there and overwrites it, so
  // that each pass vectorises.
  for (int64_t j = 0; j < H; ++j)
    grad_gates[3 * stride + j] = tanh_(gates[stride + j] * c_prev[j] + gates[j] * gates[2 * stride + j]);
  for_units<scalar_t>(H, [&](auto as, int64_t j) {
    typedef typename decltype(as)::type V;
    const V i = load<V>(gates + j), f = load<V>(gates + stride + j), g = load<V>(gates + 2 * stride + j);
    const V o = load<V>(gates + 3 * stride + j), cp = load<V>(c_prev + j), tc = load<V>(grad_gates + 3 * stride + j);
    V dh = kTwoGradSources ? load<V>(dh_a + j) + load<V>(dh_b + j) : load<V>(dh_a + j);
    V dc_carry = load<V>(dc_state + j);
    V dc_zone = V{};
    if (kZoneout) {
      dc_zone = load<V>(zc + j) * dc_carry;
      dc_carry -= dc_zone;
      if (zh != nullptr) {
        const V to_prev = load<V>(zh + j) * dh;
        store(grad_h_prev + j, to_prev);
        dh -= to_prev;
      }
    }
    const scalar_t one = 1;
    const V dc = dc_carry + dh * o * (one - tc * tc);
    store(grad_gates + j, dc * g * i * (one - i));
    store(grad_gates + stride + j, dc * cp * f * (one - f));
    store(grad_gates + 2 * stride + j, dc * i * (one - g * g));
    store(grad_gates + 3 * stride + j, dh * tc * o * (one - o));
    store(dc_state + j, dc * f + dc_zone);
    if (kWriteTilde) store(h_tilde + j, o * tc);
  });
}

// Layer normalisation (see LstmLayerNorm in csrc/lstm.h). The row kernels
// below run in passes over the row, since each normalisation needs the row's
// statistics first, and, like the plain kernels, in the storage type's
// arithmetic; only the statistics (sums over a row) are accumulated in
// double. Per-unit values that later passes reuse live in a scratch row
// (forward: H, backward: 4H).
template <typename scalar_t>
struct LayerNormRow {
  scalar_t* norm_hh;  // (4H) recurrent product in, normalised out (forward); normalised in (backward)
  const scalar_t* hh_weight;
  const scalar_t* hh_bias;  // forward only
  const scalar_t* cell_weight;
  const scalar_t* cell_bias;
  scalar_t* stats;          // [rstd_ih, rstd_hh, mean_cell, rstd_cell]
  scalar_t* grad_rec;       // (4H) backward only
  scalar_t* grad_ln_cell;   // (2H) backward only
  scalar_t* scratch;
};

// Mean and 1 / sqrt(biased variance + eps) of n values, in two passes (the
// one-pass formula cancels badly when the mean is large against the spread).
template <typename T>
__attribute__((always_inline)) inline void mean_rstd(int64_t n, const T* __restrict x, double& mean, double& rstd) {
  // `omp simd reduction` lets the compiler reorder the sums into vector
  // lanes (it otherwise keeps a double sum in order, one element at a time).
  double sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  mean = sum / n;
  double sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < n; ++j) {
    const double d = x[j] - mean;
    sq += d * d;
  }
  rstd = 1.0 / std::sqrt(sq / n + kLstmLayerNormEps);
}

// sum_u d_u and sum_u d_u * n_u, d_u = a_u * b_u, in double.
template <typename T>
__attribute__((always_inline)) inline void product_sums(int64_t n, const T* __restrict a, const T* __restrict b,
                                                        const T* __restrict norm, double& sum_d, double& sum_dn) {
  double sd = 0, sdn = 0;
#pragma omp simd reduction(+ : sd, sdn)
  for (int64_t u = 0; u < n; ++u) {
    const double d = double(a[u]) * b[u];
    sd += d;
    sdn += d * norm[u];
  }
  sum_d = sd;
  sum_dn = sdn;
}

template <typename scalar_t, bool kZoneout>
__attribute__((always_inline)) inline void forward_row_ln_impl(int64_t H, const ForwardRow<scalar_t>& r,
                                                               const LayerNormRow<scalar_t>& l) {
  const int64_t G = 4 * H;
  // Not restrict: the gates are written here and by activate_and_update_cell.
  scalar_t* gates = r.gates;
  const scalar_t* go = r.gates + 3 * H;
  scalar_t* __restrict rec = l.norm_hh;
  const scalar_t* __restrict w_hh = l.hh_weight;
  const scalar_t* __restrict b_hh = l.hh_bias;
  const scalar_t* __restrict w_c = l.cell_weight;
  const scalar_t* __restrict b_c = l.cell_bias;
  scalar_t* __restrict h_out = r.h_out;
  const scalar_t* __restrict zh = r.zoneout_hidden;
  const scalar_t* h_prev = r.h_prev;
  scalar_t* __restrict c_new_row = l.scratch;  // c~_t, before zoneout
  double mean_hh_d, rstd_hh_d;
  mean_rstd(G, rec, mean_hh_d, rstd_hh_d);
  const scalar_t mean_hh = static_cast<scalar_t>(mean_hh_d), rstd_hh = static_cast<scalar_t>(rstd_hh_d);
  for_units<scalar_t>(G, [&](auto as, int64_t u) {  // LN_hh, added to the pre-activations
    typedef typename decltype(as)::type V;
    const V n = (load<V>(rec + u) - mean_hh) * rstd_hh;
    store(rec + u, n);
    store(gates + u, load<V>(gates + u) + (load<V>(w_hh + u) * n + load<V>(b_hh + u)));
  });
  activate_and_update_cell<scalar_t, kZoneout>(H, H, r, c_new_row);
  double mean_c_d, rstd_c_d;
  mean_rstd(H, c_new_row, mean_c_d, rstd_c_d);
  const scalar_t mean_c = static_cast<scalar_t>(mean_c_d), rstd_c = static_cast<scalar_t>(rstd_c_d);
  for_units<scalar_t>(H, [&](auto as, int64_t j) {  // y = LN_cell(c~_t), kept in h_out until the next pass
    typedef typename decltype(as)::type V;
    store(h_out + j, load<V>(w_c + j) * ((load<V>(c_new_row + j) - mean_c) * rstd_c) + load<V>(b_c + j));
  });
  for (int64_t j = 0; j < H; ++j) h_out[j] = go[j] * tanh_(h_out[j]);
  if (kZoneout && zh != nullptr)
    for (int64_t j = 0; j < H; ++j) h_out[j] = zh[j] * h_prev[j] + (scalar_t(1) - zh[j]) * h_out[j];
  if (r.h_state != nullptr)
    for (int64_t j = 0; j < H; ++j) r.h_state[j] = h_out[j];
  l.stats[1] = rstd_hh;
  l.stats[2] = mean_c;
  l.stats[3] = rstd_c;
}

// LN backward of one row: given d = gain * dL/dy, y = LN(x), and n the
// normalised x, dL/dx = rstd * (d - mean(d) - n * mean(d * n)).
template <typename scalar_t, bool kTwoGradSources, bool kWriteTilde, bool kZoneout>
__attribute__((always_inline)) inline void backward_row_ln_impl(int64_t H, const BackwardRow<scalar_t>& r,
                                                                const LayerNormRow<scalar_t>& l) {
  const int64_t G = 4 * H;
  const scalar_t* __restrict gates = r.gates;
  const scalar_t* __restrict c_prev = r.c_prev;
  const scalar_t* __restrict dh_a = r.dh_a;
  const scalar_t* __restrict dh_b = r.dh_b;
  scalar_t* __restrict dc_state = r.dc_state;
  scalar_t* __restrict grad_gates = r.grad_gates;
  scalar_t* __restrict h_tilde = r.h_tilde;
  const scalar_t* __restrict zc = r.zoneout_cell;
  const scalar_t* __restrict zh = r.zoneout_hidden;
  scalar_t* __restrict grad_h_prev = r.grad_h_prev;
  const scalar_t* __restrict rec = l.norm_hh;
  const scalar_t* __restrict w_hh = l.hh_weight;
  const scalar_t* __restrict w_c = l.cell_weight;
  const scalar_t* __restrict b_c = l.cell_bias;
  scalar_t* __restrict grad_rec = l.grad_rec;
  scalar_t* __restrict grad_ln_cell = l.grad_ln_cell;
  scalar_t* __restrict d_row = l.scratch;           // cell_weight * dL/dy
  scalar_t* __restrict n_row = l.scratch + H;       // normalised c~
  scalar_t* __restrict tc_row = l.scratch + 2 * H;  // y, then tanh(y)
  scalar_t* __restrict dh_row = l.scratch + 3 * H;  // dL/dh~ (zoneout's share taken out)
  const scalar_t rstd_hh = l.stats[1], mean_c = l.stats[2], rstd_c = l.stats[3];
  const scalar_t one = 1;
  for_units<scalar_t>(H, [&](auto as, int64_t j) {  // c~_t recomputed, normalised
    typedef typename decltype(as)::type V;
    const V i = load<V>(gates + j), f = load<V>(gates + H + j), g = load<V>(gates + 2 * H + j);
    const V n = ((f * load<V>(c_prev + j) + i * g) - mean_c) * rstd_c;
    store(n_row + j, n);
    store(tc_row + j, load<V>(w_c + j) * n + load<V>(b_c + j));
  });
  for (int64_t j = 0; j < H; ++j) tc_row[j] = tanh_(tc_row[j]);
  for_units<scalar_t>(H, [&](auto as, int64_t j) {
    typedef typename decltype(as)::type V;
    const V o = load<V>(gates + 3 * H + j), tc = load<V>(tc_row + j), n = load<V>(n_row + j);
    V dh = kTwoGradSources ? load<V>(dh_a + j) + load<V>(dh_b + j) : load<V>(dh_a + j);
    if (kZoneout && zh != nullptr) {
      const V to_prev = load<V>(zh + j) * dh;
      store(grad_h_prev + j, to_prev);
      dh -= to_prev;
    }
    const V dy = dh * o * (one - tc * tc);
    store(grad_ln_cell + j, dy * n);
    store(grad_ln_cell + H + j, dy);
    store(d_row + j, dy * load<V>(w_c + j));
    store(dh_row + j, dh);
  });
  double sum_d = 0, sum_dn = 0;
#pragma omp simd reduction(+ : sum_d, sum_dn)
  for (int64_t j = 0; j < H; ++j) {
    sum_d += d_row[j];
    sum_dn += double(d_row[j]) * n_row[j];
  }
  const scalar_t mean_d = static_cast<scalar_t>(sum_d / H), mean_dn = static_cast<scalar_t>(sum_dn / H);
  for_units<scalar_t>(H, [&](auto as, int64_t j) {
    typedef typename decltype(as)::type V;
    const V i = load<V>(gates + j), f = load<V>(gates + H + j), g = load<V>(gates + 2 * H + j);
    const V o = load<V>(gates + 3 * H + j), cp = load<V>(c_prev + j), tc = load<V>(tc_row + j);
    V dc_carry = load<V>(dc_state + j);
    V dc_zone = V{};
    if (kZoneout) {
      dc_zone = load<V>(zc + j) * dc_carry;
      dc_carry -= dc_zone;
    }
    const V dc = dc_carry + rstd_c * (load<V>(d_row + j) - mean_d - load<V>(n_row + j) * mean_dn);
    store(grad_gates + j, dc * g * i * (one - i));
    store(grad_gates + H + j, dc * cp * f * (one - f));
    store(grad_gates + 2 * H + j, dc * i * (one - g * g));
    store(grad_gates + 3 * H + j, load<V>(dh_row + j) * tc * o * (one - o));
    store(dc_state + j, dc * f + dc_zone);
    if (kWriteTilde) store(h_tilde + j, o * tc);
  });
  // Through LN_hh: the recurrent product's gradient, from the stored gate gradients.
  double sum_g, sum_gn;
  product_sums(G, grad_gates, w_hh, rec, sum_g, sum_gn);
  const scalar_t mean_g = static_cast<scalar_t>(sum_g / G), mean_gn = static_cast<scalar_t>(sum_gn / G);
  for_units<scalar_t>(G, [&](auto as, int64_t u) {
    typedef typename decltype(as)::type V;
    store(grad_rec + u, rstd_hh * (load<V>(grad_gates + u) * load<V>(w_hh + u) - mean_g - load<V>(rec + u) * mean_gn));
  });
}

// out = rstd * (d - mean(d) - n * mean(d * n)), d = grad * gain, over one
// row of G values: the input half's LN backward (see lstm.h).
template <typename scalar_t>
__attribute__((always_inline)) inline void layer_norm_backward_row_impl(int64_t G, const scalar_t* __restrict grad,
                                                                        const scalar_t* __restrict norm,
                                                                        const scalar_t* __restrict gain,
                                                                        double rstd_d, scalar_t* __restrict out) {
  double sum_d, sum_dn;
  product_sums(G, grad, gain, norm, sum_d, sum_dn);
  const scalar_t mean_d = static_cast<scalar_t>(sum_d / G), mean_dn = static_cast<scalar_t>(sum_dn / G);
  const scalar_t rstd = static_cast<scalar_t>(rstd_d);
  for_units<scalar_t>(G, [&](auto as, int64_t u) {
    typedef typename decltype(as)::type V;
    store(out + u, rstd * (load<V>(grad + u) * load<V>(gain + u) - mean_d - load<V>(norm + u) * mean_dn));
  });
}

// Each function is compiled for AVX2+FMA and the baseline ISA (see
// vector_loops.h); one call covers one row of H units (forward_row and
// backward_row: H units of a row whose gate blocks lie `stride` apart, the
// whole row or part of it).
#define FASTNLP_LSTM_ROW_KERNELS(scalar_t)                                               \
  FASTNLP_VECTOR_CLONES void forward_row(int64_t H, int64_t stride,                     \
                                         const ForwardRow<scalar_t>& r) {               \
    if (r.zoneout_cell != nullptr)                                                      \
      forward_row_impl<scalar_t, true>(H, stride, r);                                   \
    else                                                                                \
      forward_row_impl<scalar_t, false>(H, stride, r);                                  \
  }                                                                                     \
  FASTNLP_VECTOR_CLONES void backward_row(int64_t H, int64_t stride,                    \
                                          const BackwardRow<scalar_t>& r) {             \
    if (r.zoneout_cell != nullptr) {                                                    \
      if (r.dh_b != nullptr)                                                            \
        backward_row_impl<scalar_t, true, false, true>(H, stride, r);                  \
      else                                                                              \
        backward_row_impl<scalar_t, false, true, true>(H, stride, r);                  \
    } else if (r.dh_b != nullptr) {                                                     \
      backward_row_impl<scalar_t, true, false, false>(H, stride, r);                   \
    } else {                                                                            \
      backward_row_impl<scalar_t, false, true, false>(H, stride, r);                   \
    }                                                                                   \
  }                                                                                     \
  FASTNLP_VECTOR_CLONES void layer_norm_backward_row(int64_t G, const scalar_t* grad,   \
                                                     const scalar_t* norm,              \
                                                     const scalar_t* gain, double rstd, \
                                                     scalar_t* out) {                   \
    layer_norm_backward_row_impl<scalar_t>(G, grad, norm, gain, rstd, out);             \
  }                                                                                     \
  FASTNLP_VECTOR_CLONES void forward_row_ln(int64_t H, const ForwardRow<scalar_t>& r,  \
                                            const LayerNormRow<scalar_t>& l) {          \
    if (r.zoneout_cell != nullptr)                                                      \
      forward_row_ln_impl<scalar_t, true>(H, r, l);                                     \
    else                                                                                \
      forward_row_ln_impl<scalar_t, false>(H, r, l);                                    \
  }                                                                                     \
  FASTNLP_VECTOR_CLONES void backward_row_ln(int64_t H, const BackwardRow<scalar_t>& r, \
                                             const LayerNormRow<scalar_t>& l) {         \
    if (r.zoneout_cell != nullptr) {                                                    \
      if (r.dh_b != nullptr)                                                            \
        backward_row_ln_impl<scalar_t, true, false, true>(H, r, l);                    \
      else                                                                              \
        backward_row_ln_impl<scalar_t, false, true, true>(H, r, l);                    \
    } else if (r.dh_b != nullptr) {                                                     \
      backward_row_ln_impl<scalar_t, true, false, false>(H, r, l);                     \
    } else {                                                                            \
      backward_row_ln_impl<scalar_t, false, true, false>(H, r, l);                     \
    }                                                                                   \
  }
FASTNLP_LSTM_ROW_KERNELS(float)
FASTNLP_LSTM_ROW_KERNELS(double)
#undef FASTNLP_LSTM_ROW_KERNELS
#pragma GCC diagnostic pop

// Rows are split across threads only when each thread gets enough units to
// pay for waking it.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(H, 1)); }

template <typename scalar_t>
scalar_t* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
scalar_t* row_or_null(scalar_t* base, int64_t r, int64_t width) {
  return base != nullptr ? base + r * width : nullptr;
}

void forward_step_cpu(const LstmForwardStep& s) {
  const int64_t rows = s.gates.size(0), H = s.cells.size(1);
  AT_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "lstm_forward_step_cpu", [&] {
    scalar_t* gates = s.gates.data_ptr<scalar_t>();
    scalar_t* c_state = s.c_state.data_ptr<scalar_t>();
    scalar_t* cells = s.cells.data_ptr<scalar_t>();
    scalar_t* h_out = s.h_out.data_ptr<scalar_t>();
    scalar_t* h_state = ptr_or_null<scalar_t>(s.h_state);
    const scalar_t* zc = ptr_or_null<scalar_t>(s.zoneout_cell);
    const scalar_t* zh = ptr_or_null<scalar_t>(s.zoneout_hidden);
    TORCH_CHECK(!s.zoneout_hidden.defined() || s.zoneout_cell.defined(),
                "fastnlp.lstm: zoneout_hidden needs zoneout_cell");
    const bool ln = s.norm_hh.defined();
    scalar_t* norm_hh = ptr_or_null<scalar_t>(s.norm_hh);
    scalar_t* stats = ptr_or_null<scalar_t>(s.ln_stats);
    const scalar_t* hh_w = ptr_or_null<scalar_t>(s.ln_hh_weight);
    const scalar_t* hh_b = ptr_or_null<scalar_t>(s.ln_hh_bias);
    const scalar_t* cell_w = ptr_or_null<scalar_t>(s.ln_cell_weight);
    const scalar_t* cell_b = ptr_or_null<scalar_t>(s.ln_cell_bias);
    TORCH_CHECK(!ln || (stats && hh_w && hh_b && cell_w && cell_b && s.ln_stats.scalar_type() == s.gates.scalar_type()),
                "fastnlp.lstm: a layer-norm step needs all of its tensors");
    at::parallel_for(0, rows, row_grain(H), [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> scratch(ln ? H : 0);
      for (int64_t r = r0; r < r1; ++r) {
        const ForwardRow<scalar_t> row{gates + r * 4 * H,
                                       c_state + r * H,
                                       cells + r * H,
                                       h_out + r * H,
                                       row_or_null(h_state, r, H),
                                       row_or_null(h_state, r, H),
                                       row_or_null(zc, r, H),
                                       row_or_null(zh, r, H)};
        if (ln)
          forward_row_ln(H, row,
                         LayerNormRow<scalar_t>{norm_hh + r * 4 * H, hh_w, hh_b, cell_w, cell_b, stats + r * 4,
                                                nullptr, nullptr, scratch.data()});
        else
          forward_row(H, H, row);
      }
    });
  });
}

// The whole forward time loop of one direction (LstmStepKernels::
// sequence_forward) on AVX-512, float32, or bfloat16 products
// (kCpuBfloat16ProductKernels): at each step the recurrent product on gate
// panels (gate_panels.h), then forward_row over the step's rows, all on raw
// pointers, where the step loop of csrc/lstm.cpp makes several ATen calls
// per step. Threads split the hidden units, a run of whole panels each, as
// the step loop splits its products' columns: each thread then reads only
// its panels, which stay in its core's caches from step to step, and
// computes the pointwise step of its own units; one barrier per step waits
// for all of h_t before the next step's product reads it. So h_t goes to a
// second buffer (h_{t-1}, which the other threads are still reading, stays
// where it is), and the buffers swap at every step; likewise the product's
// operand where it is not h itself (masked by recurrent dropout, or rounded
// to bfloat16), which each thread writes for its units as it writes h_t.
// Inside a parallel region (each direction of a bi-LSTM on a thread of its
// own, run_both_directions below) a call runs on its own thread.

// body(thread, threads) on each of `threads` threads at once, as many as
// there are intra-op threads and panels (one inside a parallel region:
// each direction of a bi-LSTM on a thread of its own). OpenMP itself rather
// than at::parallel_for: the threads wait for one another at every step,
// so each must know how many there are, and OpenMP may give fewer than
// asked for.
template <typename Body>
void on_panel_threads(int64_t panels, const Body& body) {
  const int64_t threads = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), panels);
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
  body(omp_get_thread_num(), omp_get_num_threads());
#else
  (void)threads;
  body(0, 1);
#endif
}

// Thread `thread` of `threads`'s share of H units in panels of `width`:
// panels [first, last), units [u0, u0 + units). (Callers copy the fields
// into plain variables: C++17 lambdas cannot capture structured bindings.)
struct PanelsOfThread {
  int64_t first, last, u0, units;
};
PanelsOfThread panels_of_thread(int64_t H, int64_t width, int64_t thread, int64_t threads) {
  const int64_t panels = (H + width - 1) / width;
  const int64_t first = thread * panels / threads, last = (thread + 1) * panels / threads;
  return {first, last, first * width, std::min(last * width, H) - first * width};
}

// Calls of fewer steps keep the step loop: packing W_hh costs about as much
// as a product at a few rows, and a cell step (one step) would pay it at
// every call.
constexpr int64_t kMinSequenceSteps = 4;

// Operand: the product's element type (float, or c10::BFloat16 with h rounded).
template <typename Operand>
struct SequenceForwardPointers {
  float* gates;
  float* c_state;
  float* cells;
  float* output;
  const Operand* weight_hh;  // contiguous
  Operand* panels;           // unpacked: each thread packs its own
  const float* recurrent_mask;
  const float* zoneout_cell;
  const float* zoneout_hidden;
  // h_{t-1} and h_t at step `step` are h[step % 2] and h[(step + 1) % 2];
  // the product reads operand[step % 2] (rows operand_stride apart) instead
  // where it is given.
  std::array<float*, 2> h;
  std::array<Operand*, 2> operand;
  int64_t operand_stride;
};

// Thread `thread` of `threads`: panels [first, last) of every step, the
// units they hold in every row, and h_t and the operand there.
template <typename Operand>
void sequence_forward_units(const LstmSequenceForward& s, const SequenceForwardPointers<Operand>& p, int64_t thread,
                            int64_t threads) {
  const int64_t T = static_cast<int64_t>(s.steps.size()), H = s.c_state.size(1);
  const PanelsOfThread mine = panels_of_thread(H, kPanelUnits, thread, threads);
  const int64_t first = mine.first, last = mine.last, u0 = mine.u0, units = mine.units;
  const bool has_operand = p.operand[0] != nullptr;
  pack_gate_panels(p.weight_hh, H, p.panels, first, last);  // (in this core's caches for the first step)
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = s.reverse ? T - 1 - step : step;
    const int64_t rows = s.steps[t], offset = s.offsets[t];
    const float* h_prev = p.h[step % 2];
    float* h_next = p.h[(step + 1) % 2];
    Operand* operand_next = p.operand[(step + 1) % 2];
    const Operand* in = p.operand[step % 2];
    int64_t ld_in = p.operand_stride;
    if constexpr (std::is_same_v<Operand, float>) {
      if (!has_operand) {
        in = h_prev;
        ld_in = H;
      }
    }
    for (int64_t block = first; block < last; ++block)
      for (int64_t row = 0; row < rows; row += kPanelRows)
        gate_panel_product(std::min(kPanelRows, rows - row), in + row * ld_in, ld_in, p.panels, H, block,
                           p.gates + (offset + row) * 4 * H, 4 * H);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = offset + r;  // the row in the packed layout
      const int64_t unit = r * H + u0, packed_unit = at * H + u0;
      const auto packed_or_null = [&](const float* base) { return base != nullptr ? base + packed_unit : nullptr; };
      forward_row(units, H,
                  ForwardRow<float>{p.gates + at * 4 * H + u0, p.c_state + unit, p.cells + packed_unit,
                                    p.output + packed_unit, h_next + unit, h_prev + unit,
                                    packed_or_null(p.zoneout_cell), packed_or_null(p.zoneout_hidden)});
      if (has_operand) {
        Operand* out = operand_next + r * p.operand_stride + u0;
        const float* mask = p.recurrent_mask != nullptr ? p.recurrent_mask + unit : nullptr;
        for (int64_t j = 0; j < units; ++j) out[j] = Operand(mask ? h_next[unit + j] * mask[j] : h_next[unit + j]);
      }
    }
#ifdef _OPENMP
#pragma omp barrier
#endif
  }
}

template <typename Operand>
void sequence_forward_with(const LstmSequenceForward& s, const at::Tensor& panels) {
  const int64_t T = static_cast<int64_t>(s.steps.size()), B = s.h_state.size(0), H = s.c_state.size(1);
  constexpr bool rounded = std::is_same_v<Operand, c10::BFloat16>;
  // Both h buffers start as h0: a row that is not alive yet (packed input,
  // in reverse) keeps h0 in both until its first step; so do the operands.
  const at::Tensor h_other = s.h_state.clone();
  std::array<at::Tensor, 2> operands;
  int64_t operand_stride = H;
  if (rounded || s.recurrent_mask.defined()) {
    operand_stride = rounded ? (H + 1) / 2 * 2 : H;  // whole pairs, the last padded with zero
    const at::Tensor first = s.recurrent_mask.defined() ? s.h_state * s.recurrent_mask : s.h_state;
    operands[0] = at::zeros({B, operand_stride}, panels.options());
    operands[0].narrow(1, 0, H).copy_(first);
    operands[1] = operands[0].clone();
  }
  const auto operand_data = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<Operand>() : nullptr; };
  const SequenceForwardPointers<Operand> p{s.gates.data_ptr<float>(),
                                           s.c_state.data_ptr<float>(),
                                           s.cells.data_ptr<float>(),
                                           s.output.data_ptr<float>(),
                                           s.weight_hh.const_data_ptr<Operand>(),
                                           panels.mutable_data_ptr<Operand>(),
                                           ptr_or_null<float>(s.recurrent_mask),
                                           ptr_or_null<float>(s.zoneout_cell),
                                           ptr_or_null<float>(s.zoneout_hidden),
                                           {s.h_state.data_ptr<float>(), h_other.data_ptr<float>()},
                                           {operand_data(operands[0]), operand_data(operands[1])},
                                           operand_stride};
  on_panel_threads((H + kPanelUnits - 1) / kPanelUnits,
                   [&](int64_t thread, int64_t threads) { sequence_forward_units(s, p, thread, threads); });
  // h_n of each sequence: h_t of its last step, as output holds it.
  std::vector<int64_t> last_step(B, -1);
  for (int64_t step = 0; step < T; ++step) {
    const int64_t t = s.reverse ? T - 1 - step : step;
    for (int64_t r = 0; r < s.steps[t]; ++r) last_step[r] = t;
  }
  float* h_state = s.h_state.data_ptr<float>();
  for (int64_t r = 0; r < B; ++r)
    if (last_step[r] >= 0) std::copy_n(p.output + (s.offsets[last_step[r]] + r) * H, H, h_state + r * H);
}

bool sequence_forward_cpu(const LstmSequenceForward& s) {
  if (static_cast<int64_t>(s.steps.size()) < kMinSequenceSteps || s.gates.scalar_type() != at::kFloat ||
      !gate_panels_take(s.weight_hh))
    return false;
  // Named in profiles (and so in the tests, which look for it there).
  RECORD_FUNCTION("fastnlp::lstm_sequence_forward_cpu", std::vector<c10::IValue>());
  const at::Tensor panels = empty_gate_panels(s.weight_hh);
  if (panels.scalar_type() == at::kBFloat16)
    sequence_forward_with<c10::BFloat16>(s, panels);
  else
    sequence_forward_with<float>(s, panels);
  return true;
}

// The backward time loop over one chunk's steps (LstmStepKernels::
// chunk_backward) on AVX-512, float32 or bfloat16 products, as
// sequence_forward_cpu runs the forward: raw pointers from the chunk's first
// step to its last, threads splitting the hidden units by unit panels
// (gate_panels.h). A step's pointwise backward of a thread's units needs
// only its own units of dh and dc, but the recurrent product dh_{t-1} =
// g_t W_hh of its units needs every unit of g_t: so one barrier per step,
// between the two. With bfloat16 products g_t is rounded for the product,
// as the step loop rounds it for oneDNN's (its few-row steps, at most four
// rows, multiply the float32 g_t by the widened weight instead).
//
// Operand: the product's element type (float, or c10::BFloat16 with g_t
// rounded: each thread rounds its units of g_t as it writes them, into
// `rounded`, rows as in grad_gates).
template <typename Operand>
struct ChunkBackwardPointers {
  const float* gates;
  const float* cells;
  const float* output;
  const float* h0;
  const float* c0;
  const float* grad_output;
  float* dh_state;
  float* dc_state;
  float* grad_gates;
  float* h_prev;  // nullptr: not wanted
  const Operand* weight_hh;
  Operand* panels;  // unpacked: each thread packs its own
  Operand* rounded;  // bfloat16 only
  const float* recurrent_mask;
  const float* zoneout_cell;
  const float* zoneout_hidden;
  float* grad_h_zoneout;
};

template <typename Operand>
void chunk_backward_units(const LstmChunkBackward& s, const ChunkBackwardPointers<Operand>& p, int64_t thread,
                          int64_t threads) {
  constexpr bool rounds = std::is_same_v<Operand, c10::BFloat16>;
  const int64_t T = static_cast<int64_t>(s.steps.size()), H = s.dc_state.size(1);
  const PanelsOfThread mine = panels_of_thread(H, kUnitPanelUnits, thread, threads);
  const int64_t first = mine.first, last = mine.last, u0 = mine.u0, units = mine.units;
  pack_unit_panels(p.weight_hh, H, p.panels, first, last);
  for (int64_t step = s.first_s; step >= s.last_s; --step) {
    const int64_t t = s.reverse ? T - 1 - step : step;
    const int64_t rows = s.steps[t], offset = s.offsets[t], at_row = offset - s.row_begin;
    const int64_t prev = previous_step(t, T, s.reverse);
    const int64_t rows_with_prev = prev < 0 ? 0 : std::min(rows, s.steps[prev]);
    const int64_t prev_offset = prev < 0 ? 0 : s.offsets[prev];
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t at = offset + r, unit = r * H + u0;
      const int64_t prev_unit = r < rows_with_prev ? (prev_offset + r) * H + u0 : -1;
      if (p.h_prev != nullptr) {
        float* out = p.h_prev + (at_row + r) * H + u0;
        const float* h = prev_unit >= 0 ? p.output + prev_unit : p.h0 + unit;
        for (int64_t j = 0; j < units; ++j) out[j] = p.recurrent_mask ? h[j] * p.recurrent_mask[unit + j] : h[j];
      }
      const auto packed_or_null = [&](const float* base) { return base != nullptr ? base + at * H + u0 : nullptr; };
      float* grad_gates = p.grad_gates + (at_row + r) * 4 * H + u0;
      backward_row(units, H,
                   BackwardRow<float>{p.gates + at * 4 * H + u0,
                                      prev_unit >= 0 ? p.cells + prev_unit : p.c0 + unit,
                                      p.grad_output + at * H + u0,
                                      p.dh_state + unit,
                                      p.dc_state + unit,
                                      grad_gates,
                                      nullptr,
                                      packed_or_null(p.zoneout_cell),
                                      packed_or_null(p.zoneout_hidden),
                                      p.zoneout_hidden != nullptr ? p.grad_h_zoneout + unit : nullptr});
      if constexpr (rounds) {
        Operand* out = p.rounded + (at_row + r) * 4 * H + u0;
        for (int64_t g = 0; g < 4; ++g)
          for (int64_t j = g * H; j < g * H + units; ++j) out[j] = Operand(grad_gates[j]);
      }
    }
#ifdef _OPENMP
#pragma omp barrier
#endif
    const Operand* g;
    if constexpr (rounds)
      g = p.rounded + at_row * 4 * H;
    else
      g = p.grad_gates + at_row * 4 * H;
    for (int64_t block = first; block < last; ++block)
      for (int64_t row = 0; row < rows; row += kPanelRows)
        unit_panel_product(std::min(kPanelRows, rows - row), g + row * 4 * H, 4 * H, p.panels, H, block,
                           p.dh_state + row * H, H);
    if (p.recurrent_mask != nullptr || p.zoneout_hidden != nullptr)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t j = r * H + u0; j < r * H + u0 + units; ++j) {
          if (p.recurrent_mask != nullptr) p.dh_state[j] *= p.recurrent_mask[j];
          if (p.zoneout_hidden != nullptr) p.dh_state[j] += p.grad_h_zoneout[j];
        }
  }
}

template <typename Operand>
void chunk_backward_with(const LstmChunkBackward& s) {
  const int64_t H = s.dc_state.size(1);
  const at::Tensor panels = empty_unit_panels(s.weight_hh);
  const at::Tensor rounded = std::is_same_v<Operand, c10::BFloat16>
                                 ? at::empty(s.grad_gates.sizes(), s.grad_gates.options().dtype(at::kBFloat16))
                                 : at::Tensor();
  const ChunkBackwardPointers<Operand> p{s.gates.const_data_ptr<float>(),
                                         s.cells.const_data_ptr<float>(),
                                         s.output.const_data_ptr<float>(),
                                         s.h0.const_data_ptr<float>(),
                                         s.c0.const_data_ptr<float>(),
                                         s.grad_output.const_data_ptr<float>(),
                                         s.dh_state.data_ptr<float>(),
                                         s.dc_state.data_ptr<float>(),
                                         s.grad_gates.data_ptr<float>(),
                                         ptr_or_null<float>(s.h_prev),
                                         s.weight_hh.const_data_ptr<Operand>(),
                                         panels.mutable_data_ptr<Operand>(),
                                         rounded.defined() ? rounded.mutable_data_ptr<Operand>() : nullptr,
                                         ptr_or_null<float>(s.recurrent_mask),
                                         ptr_or_null<float>(s.zoneout_cell),
                                         ptr_or_null<float>(s.zoneout_hidden),
                                         ptr_or_null<float>(s.grad_h_zoneout)};
  on_panel_threads((H + kUnitPanelUnits - 1) / kUnitPanelUnits,
                   [&](int64_t thread, int64_t threads) { chunk_backward_units(s, p, thread, threads); });
}

bool chunk_backward_cpu(const LstmChunkBackward& s) {
  if (s.first_s - s.last_s + 1 < kMinSequenceSteps || s.gates.scalar_type() != at::kFloat ||
      !gate_panels_take(s.weight_hh))
    return false;
  RECORD_FUNCTION("fastnlp::lstm_chunk_backward_cpu", std::vector<c10::IValue>());
  if (s.weight_hh.scalar_type() == at::kBFloat16)
    chunk_backward_with<c10::BFloat16>(s);
  else
    chunk_backward_with<float>(s);
  return true;
}

void backward_step_cpu(const LstmBackwardStep& s) {
  const int64_t rows = s.gates.size(0), H = s.dc_state.size(1);
  AT_DISPATCH_FLOATING_TYPES(s.gates.scalar_type(), "lstm_backward_step_cpu", [&] {
    const scalar_t* gates = s.gates.data_ptr<scalar_t>();
    const scalar_t* c_prev = s.rows_with_prev > 0 ? s.c_prev.data_ptr<scalar_t>() : nullptr;
    const scalar_t* c0 = s.c0.data_ptr<scalar_t>();
    const scalar_t* dh_a = s.dh_a.data_ptr<scalar_t>();
    const scalar_t* dh_b = ptr_or_null<scalar_t>(s.dh_b);
    scalar_t* dc_state = s.dc_state.data_ptr<scalar_t>();
    scalar_t* grad_gates = s.grad_gates.data_ptr<scalar_t>();
    scalar_t* h_tilde = ptr_or_null<scalar_t>(s.h_tilde);
    const scalar_t* zc = ptr_or_null<scalar_t>(s.zoneout_cell);
    const scalar_t* zh = ptr_or_null<scalar_t>(s.zoneout_hidden);
    scalar_t* grad_h_prev = ptr_or_null<scalar_t>(s.grad_h_prev);
    // The row variants: dh from two sources (no projection) or one, with the
    // projection's input written; see backward_row.
    // Asked of the tensors, not the pointers: at hidden size 0 a given tensor
    // is empty and its data pointer null.
    TORCH_CHECK(s.dh_b.defined() != s.h_tilde.defined(), "fastnlp.lstm: exactly one of dh_b, h_tilde");
    TORCH_CHECK(!s.zoneout_hidden.defined() || (s.zoneout_cell.defined() && s.grad_h_prev.defined()),
                "fastnlp.lstm: zoneout_hidden needs zoneout_cell and grad_h_prev");
    const bool ln = s.norm_hh.defined();
    scalar_t* norm_hh = ptr_or_null<scalar_t>(s.norm_hh);
    scalar_t* stats = ptr_or_null<scalar_t>(s.ln_stats);
    const scalar_t* hh_w = ptr_or_null<scalar_t>(s.ln_hh_weight);
    const scalar_t* cell_w = ptr_or_null<scalar_t>(s.ln_cell_weight);
    const scalar_t* cell_b = ptr_or_null<scalar_t>(s.ln_cell_bias);
    scalar_t* grad_rec = ptr_or_null<scalar_t>(s.grad_rec);
    scalar_t* grad_ln_cell = ptr_or_null<scalar_t>(s.grad_ln_cell);
    TORCH_CHECK(!ln || (stats && hh_w && cell_w && cell_b && grad_rec && grad_ln_cell &&
                        s.ln_stats.scalar_type() == s.gates.scalar_type()),
                "fastnlp.lstm: a layer-norm step needs all of its tensors");
    at::parallel_for(0, rows, row_grain(H), [&](int64_t r0, int64_t r1) {
      std::vector<scalar_t> scratch(ln ? 4 * H : 0);
      for (int64_t r = r0; r < r1; ++r) {
        // A row whose first step this is reads c0.
        const scalar_t* prev_row = r < s.rows_with_prev ? c_prev + r * H : c0 + r * H;
        const BackwardRow<scalar_t> row{gates + r * 4 * H,         prev_row,
                                        dh_a + r * H,              row_or_null(dh_b, r, H),
                                        dc_state + r * H,          grad_gates + r * 4 * H,
                                        row_or_null(h_tilde, r, H), row_or_null(zc, r, H),
                                        row_or_null(zh, r, H),     row_or_null(grad_h_prev, r, H)};
        if (ln)
          backward_row_ln(H, row,
                          LayerNormRow<scalar_t>{norm_hh + r * 4 * H, hh_w, nullptr, cell_w, cell_b, stats + r * 4,
                                                 grad_rec + r * 4 * H, grad_ln_cell + r * 2 * H, scratch.data()});
        else
          backward_row(H, H, row);
      }
    });
  });
}

void layer_norm_backward_cpu(const at::Tensor& grad, const at::Tensor& norm, const at::Tensor& ln_stats,
                             const at::Tensor& gain, at::Tensor& out) {
  const int64_t rows = grad.size(0), G = grad.size(1);
  TORCH_CHECK(grad.is_contiguous() && norm.is_contiguous() && ln_stats.is_contiguous() && gain.is_contiguous() &&
                  out.is_contiguous() && norm.sizes() == grad.sizes() && out.sizes() == grad.sizes() &&
                  ln_stats.size(0) == rows && gain.numel() == G,
              "fastnlp.lstm: layer_norm_backward_cpu got mismatched tensors");
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "lstm_layer_norm_backward_cpu", [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* n = norm.data_ptr<scalar_t>();
    const scalar_t* w = gain.data_ptr<scalar_t>();
    const scalar_t* stats = ln_stats.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, row_grain(G), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        layer_norm_backward_row(G, g + r * G, n + r * G, w, stats[r * 4], o + r * G);
    });
  });
}

constexpr LstmStepKernels kCpuKernels{&forward_step_cpu,
                                       &backward_step_cpu,
                                       &layer_norm_backward_cpu,
                                       &few_rows_addmm_,
                                       kFewRowsMax,
                                       &onednn_prepare_right,
                                       &onednn_prepared_matmul,
                                       &sequence_forward_cpu,
                                       /*sequence_backward=*/nullptr,
                                       &chunk_backward_cpu,
                                       &onednn_linear};

// bfloat16. The step kernels compute in float32 or float64, so a bfloat16
// call is widened to float32 and its results are rounded back. Where oneDNN
// has bfloat16 products on this CPU (onednn_bfloat16_products), the matrix
// products round their operands to bfloat16 (LstmStepKernels::product_dtype)
// and run at about twice the speed of float32 ones, as the products of
// torch's own bfloat16 LSTM on the CPU (oneDNN's RNN) do; the state, the
// activations and what is saved for the backward pass stay float32 (the
// outputs are rounded once, at the end). W_ih and W_hh go in as they are;
// the rest is widened. Elsewhere all of it runs in float32.
constexpr LstmStepKernels with_product_dtype(LstmStepKernels kernels, c10::ScalarType dtype) {
  kernels.product_dtype = dtype;
  return kernels;
}
constexpr LstmStepKernels kCpuBfloat16ProductKernels = with_product_dtype(kCpuKernels, at::kBFloat16);

void check_cpu_dtype(const at::Tensor& input) {
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble ||
                  input.scalar_type() == at::kBFloat16,
              "fastnlp.lstm: the CPU kernel takes float32, float64 or bfloat16, got ", input.scalar_type());
}

bool is_bfloat16(const at::Tensor& input) { return input.scalar_type() == at::kBFloat16; }

const LstmStepKernels& kernels_for(const at::Tensor& input) {
  return is_bfloat16(input) && onednn_bfloat16_products() ? kCpuBfloat16ProductKernels : kCpuKernels;
}

// A bfloat16 tensor as float32; anything else as it is.
at::Tensor widened(const at::Tensor& t) { return t.defined() && is_bfloat16(t) ? t.to(at::kFloat) : t; }
std::optional<at::Tensor> widened(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(widened(*t)) : t;
}

// W_ih or W_hh for `kernels`: as it is where they take it in their product
// dtype, else widened.
at::Tensor weight_for(const LstmStepKernels& kernels, const at::Tensor& weight) {
  return kernels.product_dtype == weight.scalar_type() ? weight : widened(weight);
}

// A float32 result of a bfloat16 call, rounded back.
at::Tensor narrowed(const at::Tensor& t) { return t.defined() ? t.to(at::kBFloat16) : t; }

// The entries I of a result tuple of a bfloat16 call, rounded back.
template <typename Tuple, size_t... I>
void narrow_entries(Tuple& t, std::index_sequence<I...>) {
  ((std::get<I>(t) = narrowed(std::get<I>(t))), ...);
}

LstmForwardResult lstm_forward_cpu(
    const at::Tensor& input, const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0,
    const at::Tensor& weight_ih, const at::Tensor& weight_hh, const std::optional<at::Tensor>& bias_ih,
    const std::optional<at::Tensor>& bias_hh, const std::optional<at::Tensor>& weight_hr, bool reverse,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden, const std::optional<at::Tensor>& ln_ih_weight,
    const std::optional<at::Tensor>& ln_ih_bias, const std::optional<at::Tensor>& ln_hh_weight,
    const std::optional<at::Tensor>& ln_hh_bias, const std::optional<at::Tensor>& ln_cell_weight,
    const std::optional<at::Tensor>& ln_cell_bias) {
  check_cpu_dtype(input);
  const LstmRegularisers regularisers{recurrent_mask, zoneout_cell, zoneout_hidden};
  const LstmLayerNorm layer_norm{ln_ih_weight, ln_ih_bias, ln_hh_weight, ln_hh_bias, ln_cell_weight, ln_cell_bias};
  if (!is_bfloat16(input))
    return lstm_forward_impl(kCpuKernels, input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh,
                             weight_hr, reverse, regularisers, layer_norm);
  // Checked as given: widening would hide an argument in another dtype.
  lstm_check_forward_arguments(input, batch_sizes, h0, c0, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr,
                               regularisers, layer_norm);
  const LstmStepKernels& kernels = kernels_for(input);
  LstmForwardResult result = lstm_forward_impl(
      kernels, widened(input), batch_sizes, widened(h0), widened(c0), weight_for(kernels, weight_ih),
      weight_for(kernels, weight_hh), widened(bias_ih), widened(bias_hh), widened(weight_hr), reverse,
      LstmRegularisers{widened(recurrent_mask), widened(zoneout_cell), widened(zoneout_hidden)},
      LstmLayerNorm{widened(ln_ih_weight), widened(ln_ih_bias), widened(ln_hh_weight), widened(ln_hh_bias),
                    widened(ln_cell_weight), widened(ln_cell_bias)});
  // output, h_n and c_n; what is saved for the backward pass stays float32.
  narrow_entries(result, std::index_sequence<0, 1, 2>{});
  return result;
}

LstmBackwardResult lstm_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& grad_c_n, const at::Tensor& input,
    const at::Tensor& batch_sizes, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& weight_ih,
    const at::Tensor& weight_hh, const std::optional<at::Tensor>& weight_hr, bool has_bias, bool reverse,
    const at::Tensor& output, const at::Tensor& gates, const at::Tensor& cells,
    const std::optional<at::Tensor>& recurrent_mask, const std::optional<at::Tensor>& zoneout_cell,
    const std::optional<at::Tensor>& zoneout_hidden, const std::optional<at::Tensor>& ln_ih_weight,
    const std::optional<at::Tensor>& ln_hh_weight, const std::optional<at::Tensor>& ln_cell_weight,
    const std::optional<at::Tensor>& ln_cell_bias, const std::optional<at::Tensor>& norm_ih,
    const std::optional<at::Tensor>& norm_hh, const std::optional<at::Tensor>& ln_stats, bool input_grad,
    bool weight_grads) {
  check_cpu_dtype(input);
  const bool bfloat16 = is_bfloat16(input);
  // Checked as given, as in lstm_forward_cpu.
  if (bfloat16)
    lstm_check_inputs(input, batch_sizes, h0, c0, weight_ih, weight_hh, std::nullopt, std::nullopt, weight_hr);
  const LstmStepKernels& kernels = kernels_for(input);
  // (A generic lambda: the same type back, widened for a bfloat16 call.)
  const auto w = [bfloat16](const auto& t) { return bfloat16 ? widened(t) : t; };
  LstmBackwardResult result = lstm_backward_impl(
      kernels, w(grad_output), w(grad_h_n), w(grad_c_n), w(input), batch_sizes, w(h0), w(c0),
      weight_for(kernels, weight_ih), weight_for(kernels, weight_hh), w(weight_hr), has_bias, reverse, w(output),
      w(gates), w(cells),
      LstmRegularisers{w(recurrent_mask), w(zoneout_cell), w(zoneout_hidden)},
      LstmLayerNorm{w(ln_ih_weight), std::nullopt, w(ln_hh_weight), std::nullopt, w(ln_cell_weight),
                    w(ln_cell_bias)},
      LstmLayerNormSaved{w(norm_ih), w(norm_hh), ln_stats}, LstmGradientsWanted{input_grad, weight_grads});
  if (bfloat16) narrow_entries(result, std::make_index_sequence<std::tuple_size_v<LstmBackwardResult>>{});
  return result;
}

// ---------------------------------------------------------------------------
// Both directions of a layer at once (lstm_forward_pair / lstm_backward_pair).
// Each direction runs on its own thread; inside that parallel region the
// kernels' own parallel loops and the BLAS run single-threaded. At the small
// row counts of an LSTM step that beats splitting every product between the
// cores: measured on the 2-core CI machine, bi-LSTM B=32 T=64 I=H=256,
// forward+backward about 1.3x faster than the two directions one after the
// other.

// direction(0) and direction(1): on two threads when there are exactly two,
// each with the caller's dispatcher state (the worker would otherwise see
// autograd and grad mode as at top level); otherwise one after the other,
// each with every thread (measured only on two cores: with more, one thread
// per direction would leave the rest idle).
LstmDirectionResults run_both_directions(const LstmDirection& direction) {
  LstmDirectionResults results;
  if (at::get_num_threads() != 2) {
    results[0] = direction(0);
    results[1] = direction(1);
    return results;
  }
  const at::ThreadLocalState state;
  at::parallel_for(0, 2, 1, [&](int64_t d0, int64_t d1) {
    const at::ThreadLocalStateGuard guard(state);
    for (int64_t d = d0; d < d1; ++d) results[d] = direction(d);
  });
  return results;
}

// A direction's argument list for a bfloat16 pair call: its first
// `as_input` entries checked to be bfloat16 (widening would hide one in
// another dtype), then all widened but the weights W_ih and W_hh at
// `weights` (see weight_for).
LstmArgumentList widened_list(const LstmStepKernels& kernels, const LstmArgumentList& list, const char* name,
                              size_t as_input, std::array<size_t, 2> weights) {
  LstmArgumentList result;
  for (size_t i = 0; i < list.size(); ++i) {
    const std::optional<at::Tensor> t = list.get(i);
    const bool given = t.has_value() && t->defined();
    TORCH_CHECK(i >= as_input || !given || is_bfloat16(*t), "fastnlp.lstm pair: ", name, " entry ", i,
                " has dtype ", given ? t->scalar_type() : at::kBFloat16, " but input has dtype BFloat16");
    const bool weight = i == weights[0] || i == weights[1];
    result.push_back(given && weight ? std::optional<at::Tensor>(weight_for(kernels, *t)) : widened(t));
  }
  return result;
}

LstmPairResult lstm_forward_pair_cpu(const at::Tensor& input, const at::Tensor& batch_sizes,
                                     const LstmArgumentList& forward_args, const LstmArgumentList& reverse_args) {
  check_cpu_dtype(input);
  if (!is_bfloat16(input))
    return lstm_forward_pair_impl(kCpuKernels, &run_both_directions, input, batch_sizes, forward_args,
                                  reverse_args);
  // Every entry of a forward list is in input's dtype; W_ih and W_hh are
  // entries 2 and 3 (csrc/ops.cpp).
  const LstmStepKernels& kernels = kernels_for(input);
  LstmPairResult result = lstm_forward_pair_impl(
      kernels, &run_both_directions, widened(input), batch_sizes,
      widened_list(kernels, forward_args, "forward_args", forward_args.size(), {2, 3}),
      widened_list(kernels, reverse_args, "reverse_args", reverse_args.size(), {2, 3}));
  for (std::vector<at::Tensor>* direction : {&std::get<0>(result), &std::get<1>(result)})
    for (size_t i = 0; i < 3 && i < direction->size(); ++i) (*direction)[i] = narrowed((*direction)[i]);
  return result;
}

LstmPairResult lstm_backward_pair_cpu(const at::Tensor& input, const at::Tensor& batch_sizes, bool has_bias,
                                      const LstmArgumentList& forward_args, const LstmArgumentList& reverse_args,
                                      bool input_grad, bool weight_grads) {
  check_cpu_dtype(input);
  if (!is_bfloat16(input))
    return lstm_backward_pair_impl(kCpuKernels, &run_both_directions, input, batch_sizes, has_bias, forward_args,
                                   reverse_args, LstmGradientsWanted{input_grad, weight_grads});
  // Entries 0 to 8 (grad_output to output) are in input's dtype, W_ih and
  // W_hh at 5 and 6; gates and cells (9, 10) and the layer norm's saved
  // tensors (18 to 20) are float32 (csrc/ops.cpp).
  const LstmStepKernels& kernels = kernels_for(input);
  LstmPairResult result = lstm_backward_pair_impl(
      kernels, &run_both_directions, widened(input), batch_sizes, has_bias,
      widened_list(kernels, forward_args, "forward_args", 9, {5, 6}),
      widened_list(kernels, reverse_args, "reverse_args", 9, {5, 6}), LstmGradientsWanted{input_grad, weight_grads});
  for (std::vector<at::Tensor>* direction : {&std::get<0>(result), &std::get<1>(result)})
    for (at::Tensor& t : *direction) t = narrowed(t);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnlp, CPU, m) {
  m.impl("lstm_forward", &lstm_forward_cpu);
  m.impl("lstm_backward", &lstm_backward_cpu);
  m.impl("lstm_forward_pair", &lstm_forward_pair_cpu);
  m.impl("lstm_backward_pair", &lstm_backward_pair_cpu);
}

}  // namespace fastnlp
