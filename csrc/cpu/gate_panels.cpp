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
// float32 multiply-adds on half the bytes. A unit panel (the backward's) is
// read the same way, its four vectors being four groups of 16 units of one
// row of W_hh.
#include "cpu/gate_panels.h"

#include "cpu/few_rows_matmul.h"

#include <algorithm>
#include <array>
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

// Where a product of R rows leaves its R x 4 vectors of sums: vector [r][c]
// at data + r * ld + c * group_stride, lanes `lanes[c]` of it only (a gate
// panel's four gates lie H apart, a unit panel's four groups of 16 units
// next to one another; lanes past H are masked off: the panel holds zeros
// there, and those lanes of data belong to the next gate, row or nothing),
// added to what is there or stored.
struct PanelOut {
  float* data;
  int64_t ld;
  int64_t group_stride;
  std::array<__mmask16, 4> lanes;
  bool accumulate;
};

template <int R>
FASTNLP_GATE_PANELS_TARGET inline void store_sums(const __m512 (&sums)[R][4], const PanelOut& out) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 4; ++c) {
      float* p = out.data + r * out.ld + c * out.group_stride;
      const __m512 v = out.accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(out.lanes[c], p), sums[r][c]) : sums[r][c];
      _mm512_mask_storeu_ps(p, out.lanes[c], v);
    }
}

// The product of R rows (see gate_panel_product), float32: K values of k.
template <int R>
FASTNLP_GATE_PANELS_TARGET void panel_rows(int64_t K, const float* h, int64_t ldh, const float* panel,
                                           const PanelOut& out) {
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
  store_sums<R>(sums, out);
}

// ... and bfloat16: `pairs` pairs of k, each row's pair broadcast as one
// 32-bit element.
template <int R>
FASTNLP_BFLOAT16_PANELS_TARGET void panel_rows(int64_t pairs, const c10::BFloat16* h, int64_t ldh,
                                               const c10::BFloat16* panel, const PanelOut& out) {
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
  store_sums<R>(sums, out);
}

// The product of 1 to kPanelRows rows on a panel (K steps of its loop over k).
template <typename Element>
void product_of_rows(int64_t rows, int64_t K, const Element* h, int64_t ldh, const Element* panel,
                     const PanelOut& out) {
  switch (rows) {
    case 1: return panel_rows<1>(K, h, ldh, panel, out);
    case 2: return panel_rows<2>(K, h, ldh, panel, out);
    case 3: return panel_rows<3>(K, h, ldh, panel, out);
    case 4: return panel_rows<4>(K, h, ldh, panel, out);
  }
  TORCH_CHECK(false, "fastnlp: a panel product takes 1 to ", kPanelRows, " rows, got ", rows);
}

// The lanes of the n (clipped to [0, 16]) first elements of a vector.
__mmask16 first_lanes(int64_t n) {
  return static_cast<__mmask16>((uint32_t{1} << std::clamp<int64_t>(n, 0, 16)) - 1);
}

template <typename Element>
void gate_product(int64_t rows, const Element* h, int64_t ldh, const Element* panels, int64_t H, int64_t block,
                  float* gates, int64_t ldg) {
  constexpr bool bfloat16 = std::is_same_v<Element, c10::BFloat16>;
  const int64_t depth = panel_depth(H, bfloat16);
  const int64_t first = block * kPanelUnits;
  const __mmask16 lanes = first_lanes(H - first);
  const int64_t steps = bfloat16 ? depth / 2 : depth;  // of the loop over k: values, or pairs
  product_of_rows(rows, steps, h, ldh, panels + block * depth * 4 * kPanelUnits,
                  PanelOut{gates + first, ldg, H, {lanes, lanes, lanes, lanes}, /*accumulate=*/true});
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
  gate_product(rows, h, ldh, panels, H, block, gates, ldg);
#else
  TORCH_CHECK(false, "fastnlp: gate panels need an x86-64 build with AVX-512");
#endif
}

void gate_panel_product(int64_t rows, const c10::BFloat16* h, int64_t ldh, const c10::BFloat16* panels, int64_t H,
                        int64_t block, float* gates, int64_t ldg) {
#ifdef FASTNLP_HAS_GATE_PANELS
  gate_product(rows, h, ldh, panels, H, block, gates, ldg);
#else
  TORCH_CHECK(false, "fastnlp: gate panels need an x86-64 build with AVX-512");
#endif
}

at::Tensor empty_unit_panels(const at::Tensor& weight_hh) {
  TORCH_CHECK(gate_panels_take(weight_hh),
              "fastnlp: unit panels take a float32 or bfloat16 CPU weight_hh (4H, H) that this CPU can multiply");
  const int64_t H = weight_hh.size(1), blocks = (H + kUnitPanelUnits - 1) / kUnitPanelUnits;
  const int64_t pack = weight_hh.scalar_type() == at::kBFloat16 ? 2 : 1;
  return at::empty({blocks, 4 * H / pack, kUnitPanelUnits, pack}, weight_hh.options());
}

void pack_unit_panels(const float* weight_hh, int64_t H, float* panels, int64_t first, int64_t last) {
  // Each row of W_hh holds the panel's entries for its j, in order.
  for (int64_t block = first; block < last; ++block) {
    const int64_t u0 = block * kUnitPanelUnits, units = std::min(kUnitPanelUnits, H - u0);
    float* panel = panels + block * 4 * H * kUnitPanelUnits;
    for (int64_t j = 0; j < 4 * H; ++j) {
      float* out = panel + j * kUnitPanelUnits;
      std::copy_n(weight_hh + j * H + u0, units, out);
      std::fill(out + units, out + kUnitPanelUnits, 0.0f);
    }
  }
}

void pack_unit_panels(const c10::BFloat16* weight_hh, int64_t H, c10::BFloat16* panels, int64_t first,
                      int64_t last) {
  // Rows 2q and 2q + 1 of W_hh interleaved, unit by unit (4H is even).
  for (int64_t block = first; block < last; ++block) {
    const int64_t u0 = block * kUnitPanelUnits, units = std::min(kUnitPanelUnits, H - u0);
    c10::BFloat16* panel = panels + block * 4 * H * kUnitPanelUnits;
    for (int64_t q = 0; q < 2 * H; ++q) {
      c10::BFloat16* out = panel + q * 2 * kUnitPanelUnits;
      const c10::BFloat16* even = weight_hh + 2 * q * H + u0;
      const c10::BFloat16* odd = even + H;
      for (int64_t l = 0; l < units; ++l) {
        out[2 * l] = even[l];
        out[2 * l + 1] = odd[l];
      }
      std::fill(out + 2 * units, out + 2 * kUnitPanelUnits, c10::BFloat16(0));
    }
  }
}

namespace {

template <typename Element>
void unit_product(int64_t rows, const Element* g, int64_t ldg, const Element* panels, int64_t H, int64_t block,
                  float* out, int64_t ldo) {
#ifdef FASTNLP_HAS_GATE_PANELS
  constexpr int64_t pack = std::is_same_v<Element, c10::BFloat16> ? 2 : 1;
  const int64_t u0 = block * kUnitPanelUnits;
  std::array<__mmask16, 4> lanes;
  for (int64_t c = 0; c < 4; ++c) lanes[c] = first_lanes(H - u0 - c * 16);
  product_of_rows(rows, 4 * H / pack, g, ldg, panels + block * 4 * H * kUnitPanelUnits,
                  PanelOut{out + u0, ldo, 16, lanes, /*accumulate=*/false});
#else
  TORCH_CHECK(false, "fastnlp: unit panels need an x86-64 build with AVX-512");
#endif
}

}  // namespace

void unit_panel_product(int64_t rows, const float* g, int64_t ldg, const float* panels, int64_t H, int64_t block,
                        float* out, int64_t ldo) {
  unit_product(rows, g, ldg, panels, H, block, out, ldo);
}

void unit_panel_product(int64_t rows, const c10::BFloat16* g, int64_t ldg, const c10::BFloat16* panels, int64_t H,
                        int64_t block, float* out, int64_t ldo) {
  unit_product(rows, g, ldg, panels, H, block, out, ldo);
}

}  // namespace fastnlp
