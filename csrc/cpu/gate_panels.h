// The recurrent product of the CPU's whole-sequence LSTM forward loop
// (sequence_forward_cpu in csrc/cpu/lstm.cpp): gates += h_{t-1} W_hh^T at
// every step, on W_hh packed once per call into "gate panels", each holding
// the weights of all four gates of 16 hidden units in the order the product
// reads them.
//
// Why: the step loop of csrc/lstm.cpp multiplies through oneDNN (or the
// few-rows loops) at every step, and at the row counts of an LSTM step each
// such call costs tens of microseconds around its arithmetic: ATen's
// dispatch, oneDNN's primitive lookup, a fresh result tensor, an add into
// the gates. The panel product is a plain loop called with raw pointers.
// Measured on the 2-core CI machine (AMD EPYC, AVX-512), one thread,
// medians, microseconds per product h (M, 256) @ W^T, W (1024, 256):
//   M                                    1      4      8     32
//   oneDNN, reordered W, + add_       35.8   42.0   78.1  172.5   (from Python)
//   gate panels                       11.4   19.7   38.7  153.4   (from C++)
// and for M = 64, H = 512: 1307 against 1293.
#pragma once

#include <ATen/ATen.h>

namespace fastnlp {

// Hidden units per panel: one AVX-512 vector of float32.
constexpr int64_t kPanelUnits = 16;
// Rows that one call of gate_panel_product takes at most: four rows by four
// gates are sixteen sums in vector registers.
constexpr int64_t kPanelRows = 4;

// Whether gate panels take this weight_hh: a CPU matrix (4H, H) with H >= 1,
// float32 on a processor (and OS) with AVX-512 (cpu_has_avx512), or
// bfloat16 on one with its bfloat16 dot product (cpu_has_bfloat16_dot),
// while they are allowed (below).
bool gate_panels_take(const at::Tensor& weight_hh);

// For the tests (fastnlp._C.allow_gate_panels): false makes gate_panels_take
// answer false, so that the CPU LSTM runs its step loop where it would run
// the whole-sequence loop, and the two can be compared. Returns the setting
// it replaces. Allowed from the start.
bool allow_gate_panels(bool allowed);

// An uninitialised tensor, of weight_hh's dtype, for weight_hh (4H, H)
// packed into panels (pack_gate_panels fills it). float32: (ceil(H / 16),
// H, 4, 16, 1), entry [b, k, g, l, 0] is W_hh[g * H + u, k] for unit
// u = 16 b + l; bfloat16: (ceil(H / 16), ceil(H / 2), 4, 16, 2), entry
// [b, q, g, l, e] is W_hh[g * H + u, 2 q + e]. Zero past H, in units and in k.
at::Tensor empty_gate_panels(const at::Tensor& weight_hh);

// Fills panels [first, last) of `panels` (the data of empty_gate_panels) from
// the contiguous W_hh, zeros included. Panels are independent of one
// another: the threads that multiply by them each pack their own.
void pack_gate_panels(const float* weight_hh, int64_t H, float* panels, int64_t first, int64_t last);
void pack_gate_panels(const c10::BFloat16* weight_hh, int64_t H, c10::BFloat16* panels, int64_t first,
                      int64_t last);

// gates[r * ldg + g * H + u] += sum_k h[r * ldh + k] * W_hh[g * H + u, k]
// for r < rows (1 <= rows <= kPanelRows), every gate g, and the units u of
// panel `block` (the 16 from 16 block, fewer in the last); `panels` is the
// data of empty_gate_panels(W_hh), packed. float32: sums in the order of k. bfloat16
// (h rounded to it): sums over pairs of k in their order, each pair's two
// products added in float32 by vdpbf16ps (which takes subnormal operands
// as zero); h's rows hold an even number of elements, a zero after the
// H-th where H is odd.
void gate_panel_product(int64_t rows, const float* h, int64_t ldh, const float* panels, int64_t H, int64_t block,
                        float* gates, int64_t ldg);
void gate_panel_product(int64_t rows, const c10::BFloat16* h, int64_t ldh, const c10::BFloat16* panels, int64_t H,
                        int64_t block, float* gates, int64_t ldg);

// The backward's recurrent product, dh_{t-1} = g_t W_hh (g_t the step's
// gradients of the pre-activations, 4H per row), on "unit panels": W_hh
// packed once per call into panels of 64 hidden units (four vectors), each
// holding, for every j < 4H, the 64 weights W_hh[j, u] in order (bfloat16:
// rows 2q and 2q + 1 interleaved, unit by unit, as vdpbf16ps takes pairs).
// The same product of up to four rows as the gate panels' (sixteen sums in
// registers).
constexpr int64_t kUnitPanelUnits = 64;

// An uninitialised tensor of weight_hh's dtype for its unit panels (for a
// weight_hh that gate_panels_take takes):
// float32 (ceil(H / 64), 4H, 64, 1), entry [b, j, l, 0] is W_hh[j, 64 b + l];
// bfloat16 (ceil(H / 64), 2H, 64, 2), entry [b, q, l, e] is
// W_hh[2 q + e, 64 b + l]; zero past H.
at::Tensor empty_unit_panels(const at::Tensor& weight_hh);

// Fills unit panels [first, last) from the contiguous W_hh, zeros included.
void pack_unit_panels(const float* weight_hh, int64_t H, float* panels, int64_t first, int64_t last);
void pack_unit_panels(const c10::BFloat16* weight_hh, int64_t H, c10::BFloat16* panels, int64_t first,
                      int64_t last);

// out[r * ldo + u] = sum_j g[r * ldg + j] * W_hh[j, u] (stored, not added)
// for r < rows (1 <= rows <= kPanelRows) and the units u of unit panel
// `block` (the 64 from 64 block, fewer in the last). float32: sums in the
// order of j; bfloat16 (g rounded to it): over pairs of j, as
// gate_panel_product's.
void unit_panel_product(int64_t rows, const float* g, int64_t ldg, const float* panels, int64_t H, int64_t block,
                        float* out, int64_t ldo);
void unit_panel_product(int64_t rows, const c10::BFloat16* g, int64_t ldg, const c10::BFloat16* panels, int64_t H,
                        int64_t block, float* out, int64_t ldo);

}  // namespace fastnlp
