// Matrix products through oneDNN, with the right-hand matrix reordered once
// into oneDNN's blocked layout and then used for many products: the per-step
// recurrent products of the LSTM time loop, where the weight is the same at
// every step.
//
// Why: ATen sends a float32 product on the CPU to MKL, which on the AMD CPU
// of the CI machine runs generic code and repacks the weight at every call.
// oneDNN (which nn.LSTM uses there) does not. Measured on that 2-core
// machine, torch 2.13, both threads, medians of five, microseconds per
// product (rows, 512) @ (512, 2048), as in the uni-LSTM bench:
//   rows               64     33      7
//   addmm_ (MKL)     3211   2085    866
//   oneDNN, packed   2158   1141    341
// Reordering the weight costs about as much as one product at 64 rows. In
// the LSTM's time loop, against products already split between the cores by
// hand (csrc/lstm.cpp), a uni-LSTM forward step at B = 64, H = 512 (gate
// kernel included, no grad) went from 2.84 to 2.63 ms; nn.LSTM's takes 2.38.
// ATen reaches oneDNN through the mkldnn:: operators that torch.compile's
// CPU backend uses; they are looked up in the dispatcher, so that a torch
// built without oneDNN only loses the faster path.
#pragma once

#include <ATen/ATen.h>

namespace fastnlp {

// Whether the functions below take bfloat16 matrices: this torch has the
// oneDNN operators, oneDNN is on, and it has bfloat16 products on this CPU
// (torch's own test, mkldnn::_is_mkldnn_bf16_supported: AVX-512 or newer).
// Their products accumulate in float32 and round the result to bfloat16.
// Measured on the 2-core CI machine (AMD EPYC with AVX512_BF16, torch 2.13,
// one thread, medians of 20), microseconds per product, float32 against
// bfloat16: (2048, 256) @ (256, 1024) 14179 / 5723; (32, 256) @ (256,
// 1024), with the weight reordered, 165 / 91; (1024, 1024) @ (1024, 256)
// 5568 / 2625. (MKL's own bfloat16 product, which gives float32, took 12296,
// 212 and 5796 there: generic code on this AMD CPU.)
bool onednn_bfloat16_products();

// b (k, n), reordered for products a (about `rows`, k) @ b; undefined where
// this path does not apply: not a float32 (or, see above, bfloat16) CPU
// matrix, a torch without oneDNN, or oneDNN turned off
// (torch.backends.mkldnn.enabled = False).
at::Tensor onednn_prepare_right(const at::Tensor& b, int64_t rows);

// a (m, k) @ b as a new (m, n) tensor, for b prepared by onednn_prepare_right
// and a CPU matrix of b's dtype whose rows are contiguous.
at::Tensor onednn_prepared_matmul(const at::Tensor& a, const at::Tensor& prepared);

// a (m, k) @ weight (n, k)^T + bias (n; where defined) as a new (m, n)
// tensor, for float32 (or bfloat16, see above) CPU matrices of one dtype and
// any strides, with no preparation: the
// LSTM's products over many rows, which run once per call. Undefined where
// this path does not apply (as onednn_prepare_right, or an empty matrix).
// Measured on the 2-core CI machine (torch 2.13, medians of five), one
// thread each while the other core runs the same product, as a bi-LSTM's
// two directions do: the input product (2048, 256) @ (256, 1024) 17.1 ms
// with MKL, 12.7 through oneDNN; the input gradient (1024, 1024) @
// (1024, 256) 7.3 against 5.9; a weight gradient x^T g over 1024 rows 8.3
// against 6.3.
//
// A result of kHugeResultBytes or more (the uni-LSTM bench's input product:
// (8192, 2048) float32, 64 MiB) is allocated here, on transparent huge
// pages where the OS gives them (advise_huge_pages in onednn_matmul.cpp),
// and filled in row blocks of about kResultBlockBytes, each a product of
// its own copied in. Why: glibc serves an allocation of 32 MiB or more
// with fresh pages from the OS every time, and the first write to each
// 4 KiB page faults; oneDNN's own result would take those faults inside the
// product. Measured on the 2-core CI machine (torch 2.13, medians): a fresh
// 64 MiB buffer filled 34 ms, 7.5 with huge pages, against 3.4 for one
// already mapped; that input product on two threads 63-64 ms as one
// product, 52-58 in blocks of 8 MiB on huge pages (72-76 in blocks
// without them).
constexpr int64_t kHugeResultBytes = int64_t{32} << 20;
constexpr int64_t kResultBlockBytes = int64_t{8} << 20;
at::Tensor onednn_linear(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& bias);

}  // namespace fastnlp
