// See gate_panels.h.
//
// A panel of 16 units holds, for each k, the 64 weights the product needs for
// that k: four vectors, one per gate. A call keeps the sums of its rows (up
// to four) by the four gates in sixteen vector registers, and for each k
// loads the four vectors once for all rows and broadcasts each row's h[k]:
// sixteen multiply-adds per four loads and four broadcasts. The weights are
// read in the order they lie, so a panel (H * 256 bytes) streams from L2.
// A bfloat16 panel holds pairs of neighbouring k instead, as the bfloat16
// dot-product instruction (vdpbf16ps) takes them: each of its sixteen sums
// adds the products of one pair, so one instruction does the work of two
// float32 multiply-adds on half the bytes.
#include "cpu/gate_panels.h"

#include "cpu/few_rows_matmul.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define FASTNLP_HAS_GATE_PANELS 1
#endif

namespace fastnlp {
namespace {

std::atomic<bool> gate_panels_allowed{true};

// Depth of a panel in elements of k: H, or H rounded up to pairs.
int64_t panel_depth(int64_t H, bool bfloat16) { return bfloat16 ? (H + 1) / 2 * 2 : H; }

#ifdef FASTNLP_HAS_GATE_PANELS
#define FASTNLP_GATE_PANELS_TARGET __attribute__((target("avx512f")))
#define FASTNLP_BFLOAT16_PANELS_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16")))

// gates[r * ldg + g * H + lane] += sums[r][g][lane] for the lanes in `units`
// (fewer than 16 in the last block when 16 does not divide H: the panel
// holds zeros there, and those lanes of the gates belong to the next gate).
template <int R>
FASTNLP_GATE_PANELS_TARGET inline void add_sums(const __m512 (&sums)[R][4], float* gates, int64_t ldg, int64_t H,
                                                __mmask16 units) {
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g) {
      float* out = gates + r * ldg + g * H;
      _mm512_mask_storeu_ps(out, units, _mm512_add_ps(_mm512_maskz_loadu_ps(units, out), sums[r][g]));
    }
}

// The product of R rows (see gate_panel_product), float32: K values of k.
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
  add_sums<R>(sums, gates, ldg, H, units);
}

// ... and bfloat16: `pairs` pairs of k, each row's pair broadcast as one
// 32-bit element.
template <int R>
FASTNLP_BFLOAT16_PANELS_TARGET void panel_rows(int64_t pairs, const c10::BFloat16* h, int64_t ldh,
                                               const c10::BFloat16* panel, float* gates, int64_t ldg, int64_t H,
                                               __mmask16 units) {
  __m512 sums[R][4];
  for (int r = 0; r < R; ++r)
    for (int g = 0; g < 4; ++g) sums[r][g] = _mm512_setzero_ps();
  for (int64_t q = 0; q < pairs; ++q) {
    const c10::BFloat16* w = panel + q * 4 * 2 * kPanelUnits;
    __m512bh w_gate[4];
    for (int g = 0; g < 4; ++g) w_gate[g] = (__m512bh)_mm512_loadu_si512(w + g * 2 * kPanelUnits);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, h + r * ldh + 2 * q, sizeof pair);
      const __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
      for (int g = 0; g < 4; ++g) sums[r][g] = _mm512_dpbf16_ps(sums[r][g], x, w_gate[g]);
    }
  }
  add_sums<R>(sums, gates, ldg, H, units);
}

template <typename Element>
void product_of_rows(int64_t rows, const Element* h, int64_t ldh, const Element* panels, int64_t H, int64_t block,
                     float* gates, int64_t ldg) {
  constexpr bool bfloat16 = std::is_same_v<Element, c10::BFloat16>;
  const int64_t depth = panel_depth(H, bfloat16);
  const Element* panel = panels + block * depth * 4 * kPanelUnits;
  const int64_t first = block * kPanelUnits, units = std::min(kPanelUnits, H - first);
  const __mmask16 lanes = static_cast<__mmask16>((uint32_t{1} << units) - 1);
  const int64_t steps = bfloat16 ? depth / 2 : depth;  // of the loop over k: values, or pairs
  float* out = gates + first;
  switch (rows) {
    case 1: return panel_rows<1>(steps, h, ldh, panel, out, ldg, H, lanes);
    case 2: return panel_rows<2>(steps, h, ldh, panel, out, ldg, H, lanes);
    case 3: return panel_rows<3>(steps, h, ldh, panel, out, ldg, H, lanes);
    case 4: return panel_rows<4>(steps, h, ldh, panel, out, ldg, H, lanes);
  }
  TORCH_CHECK(false, "fastnlp: gate_panel_product takes 1 to ", kPanelRows, " rows, got ", rows);
}
#endif

}  // namespace

bool allow_gate_panels(bool allowed) { return gate_panels_allowed.exchange(allowed); }

bool gate_panels_take(const at::Tensor& weight_hh) {
  if (!gate_panels_allowed.load() || !weight_hh.is_cpu() || weight_hh.dim() != 2 || weight_hh.size(1) < 1 ||
      weight_hh.size(0) != 4 * weight_hh.size(1))
    return false;
  if (weight_hh.scalar_type() == at::kFloat) return cpu_has_avx512();
  return weight_hh.scalar_type() == at::kBFloat16 && cpu_has_bfloat16_dot();
}

at::Tensor empty_gate_panels(const at::Tensor& weight_hh) {
  TORCH_CHECK(gate_panels_take(weight_hh),
              "fastnlp: gate panels take a float32 or bfloat16 CPU weight_hh (4H, H) that this CPU can multiply");
  const bool bfloat16 = weight_hh.scalar_type() == at::kBFloat16;
  const int64_t H = weight_hh.size(1), blocks = (H + kPanelUnits - 1) / kPanelUnits, pack = bfloat16 ? 2 : 1;
  return at::empty({blocks, panel_depth(H, bfloat16) / pack, 4, kPanelUnits, pack}, weight_hh.options());
}

namespace {

// See pack_gate_panels. Each lane of a panel (a gate's row of W_hh) is written
// down its column, `Pack` neighbouring k at a time: in a row of W_hh they
// are neighbours too, so each move is one 4-byte element or pair.
template <typename Element, int Pack>
void pack_panels(const Element* weight, int64_t H, Element* panels, int64_t first, int64_t last) {
  const int64_t depth = panel_depth(H, Pack == 2), moves = depth / Pack, whole = H / Pack;
  constexpr int64_t kMoveStride = 4 * kPanelUnits * Pack;  // elements between a lane's consecutive moves
  for (int64_t block = first; block < last; ++block) {
    Element* panel = panels + block * depth * 4 * kPanelUnits;
    for (int64_t g = 0; g < 4; ++g)
      for (int64_t lane = 0; lane < kPanelUnits; ++lane) {
        Element* out = panel + (g * kPanelUnits + lane) * Pack;
        const int64_t u = block * kPanelUnits + lane;
        if (u >= H) {  // past the last unit: zeros
          for (int64_t m = 0; m < moves; ++m) std::fill_n(out + m * kMoveStride, Pack, Element(0));
          continue;
        }
        const Element* row = weight + (g * H + u) * H;
        for (int64_t m = 0; m < whole; ++m) std::memcpy(out + m * kMoveStride, row + m * Pack, sizeof(Element) * Pack);
        if (whole < moves) {  // odd H in pairs: the last k and a zero
          out[whole * kMoveStride] = row[H - 1];
          out[whole * kMoveStride + 1] = Element(0);
        }
      }
  }
}

}  // namespace

void pack_gate_panels(const float* weight_hh, int64_t H, float* panels, int64_t first, int64_t last) {
  pack_panels<float, 1>(weight_hh, H, panels, first, last);
}

void pack_gate_panels(const c10::BFloat16* weight_hh, int64_t H, c10::BFloat16* panels, int64_t first,
                      int64_t last) {
  pack_panels<c10::BFloat16, 2>(weight_hh, H, panels, first, last);
}

void gate_panel_product(int64_t rows, const float* h, int64_t ldh, const float* panels, int64_t H, int64_t block,
                        float* gates, int64_t ldg) {
#ifdef FASTNLP_HAS_GATE_PANELS
  product_of_rows(rows, h, ldh, panels, H, block, gates, ldg);
#else
  TORCH_CHECK(false, "fastnlp: gate panels need an x86-64 build with AVX-512");
#endif
}

void gate_panel_product(int64_t rows, const c10::BFloat16* h, int64_t ldh, const c10::BFloat16* panels, int64_t H,
                        int64_t block, float* gates, int64_t ldg) {
#ifdef FASTNLP_HAS_GATE_PANELS
  product_of_rows(rows, h, ldh, panels, H, block, gates, ldg);
#else
  TORCH_CHECK(false, "fastnlp: gate panels need an x86-64 build with AVX-512");
#endif
}

}  // namespace fastnlp
