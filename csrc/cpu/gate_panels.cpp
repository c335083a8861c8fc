// See gate_panels.h.
//
// A panel of 16 units holds, for each k, the 64 weights the product needs for
// that k: four vectors, one per gate. A call keeps the sums of its rows (up
// to four) by the four gates in sixteen vector registers, and for each k
// loads the four vectors once for all rows and broadcasts each row's h[k]:
// sixteen multiply-adds per four loads and four broadcasts. The weights are
// read in the order they lie, so a panel (H * 256 bytes) streams from L2.
#include "cpu/gate_panels.h"

#include "cpu/few_rows_matmul.h"

#include <atomic>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTNLP_HAS_GATE_PANELS 1
#endif

namespace fastnlp {
namespace {

std::atomic<bool> gate_panels_allowed{true};

#ifdef FASTNLP_HAS_GATE_PANELS
#define FASTNLP_GATE_PANELS_TARGET __attribute__((target("avx512f")))

// The product of R rows (see gate_panel_product); `units` masks the lanes of
// the block's units, fewer than 16 in the last block when 16 does not divide
// H (the panel holds zeros there, and those lanes of the gates are not
// touched: they belong to the next gate).
template <int R>
FASTNLP_GATE_PANELS_TARGET void panel_rows(int64_t K, const float* h, int64_t ldh, const float* panel, float* gates,
                                           int64_t ldg, int64_t H, __mmask16 units) {
  __m512 sums[R][4];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g) sums[r][g] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* w = panel + k * 4 * kPanelUnits;
    const __m512 w_i = _mm512_loadu_ps(w), w_f = _mm512_loadu_ps(w + 16);
    const __m512 w_g = _mm512_loadu_ps(w + 32), w_o = _mm512_loadu_ps(w + 48);
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(h[r * ldh + k]);
      sums[r][0] = _mm512_fmadd_ps(x, w_i, sums[r][0]);
      sums[r][1] = _mm512_fmadd_ps(x, w_f, sums[r][1]);
      sums[r][2] = _mm512_fmadd_ps(x, w_g, sums[r][2]);
      sums[r][3] = _mm512_fmadd_ps(x, w_o, sums[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g) {
      float* out = gates + r * ldg + g * H;
      _mm512_mask_storeu_ps(out, units, _mm512_add_ps(_mm512_maskz_loadu_ps(units, out), sums[r][g]));
    }
}
#endif

}  // namespace

bool allow_gate_panels(bool allowed) { return gate_panels_allowed.exchange(allowed); }

bool gate_panels_take(const at::Tensor& weight_hh) {
  return gate_panels_allowed.load() && weight_hh.is_cpu() && weight_hh.scalar_type() == at::kFloat && weight_hh.dim() == 2 &&
         weight_hh.size(1) >= 1 && weight_hh.size(0) == 4 * weight_hh.size(1) && cpu_has_avx512();
}

at::Tensor pack_gate_panels(const at::Tensor& weight_hh) {
  TORCH_CHECK(gate_panels_take(weight_hh), "fastnlp: pack_gate_panels takes a float32 CPU weight_hh (4H, H)");
  const int64_t H = weight_hh.size(1), blocks = (H + kPanelUnits - 1) / kPanelUnits;
  const at::Tensor weight = weight_hh.contiguous();
  at::Tensor panels = at::zeros({blocks, H, 4, kPanelUnits}, weight.options());
  const float* w = weight.const_data_ptr<float>();
  float* p = panels.mutable_data_ptr<float>();
  // Row by row of W_hh, each written down its panel's column of lanes.
  for (int64_t g = 0; g < 4; ++g)
    for (int64_t u = 0; u < H; ++u) {
      const float* row = w + (g * H + u) * H;
      float* lane = p + (u / kPanelUnits) * H * 4 * kPanelUnits + g * kPanelUnits + u % kPanelUnits;
      for (int64_t k = 0; k < H; ++k) lane[k * 4 * kPanelUnits] = row[k];
    }
  return panels;
}

void gate_panel_product(int64_t rows, const float* h, int64_t ldh, const float* panels, int64_t H, int64_t block,
                        float* gates, int64_t ldg) {
#ifdef FASTNLP_HAS_GATE_PANELS
  const float* panel = panels + block * H * 4 * kPanelUnits;
  const int64_t first = block * kPanelUnits, units = std::min(kPanelUnits, H - first);
  const __mmask16 lanes = static_cast<__mmask16>((uint32_t{1} << units) - 1);
  float* out = gates + first;
  switch (rows) {
    case 1: return panel_rows<1>(H, h, ldh, panel, out, ldg, H, lanes);
    case 2: return panel_rows<2>(H, h, ldh, panel, out, ldg, H, lanes);
    case 3: return panel_rows<3>(H, h, ldh, panel, out, ldg, H, lanes);
    case 4: return panel_rows<4>(H, h, ldh, panel, out, ldg, H, lanes);
  }
#endif
  TORCH_CHECK(false, "fastnlp: gate_panel_product takes 1 to ", kPanelRows, " rows on an AVX-512 CPU, got ", rows);
}

}  // namespace fastnlp
