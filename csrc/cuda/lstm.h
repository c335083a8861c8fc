// Host launchers for the LSTM pointwise step kernels.
//
// Torch-free on purpose: raw device pointers, sizes and a stream in, a
// cudaError_t out (the error of the launch itself; kernels run asynchronously
// on `stream`). csrc/cuda/lstm_binding.cpp plugs them into the device-generic
// time loop of csrc/lstm.cpp as its LstmStepKernels, whose comments in
// csrc/lstm.h are the contract; the GEMMs between the steps are cuBLAS calls
// made there, not here.
//
// Layouts, all row-major and contiguous, one row per sequence alive at the
// step (`rows` of them), H = hidden size:
//   gates (rows, 4H): the four gate blocks i, f, g, o side by side, so unit j
//     of row r has its gates at r * 4H + {0, H, 2H, 3H} + j;
//   every other tensor (rows, H): unit j of row r at r * H + j.
// Every floating pointer of one call has the same type. float and double are
// computed in their own type; __half and __nv_bfloat16 are stored in that
// type and computed in float (each value is widened on load and rounded once
// on store).
//
// Buffers must not overlap, except where a pointer is documented as read and
// then overwritten in place.
//
// Sizes: rows, H >= 0; rows * H <= 2^60. rows == 0 or H == 0 returns
// cudaSuccess without launching. Invalid sizes, or a null pointer that the
// sizes require, return cudaErrorInvalidValue.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

namespace fastnlp {
namespace cuda_impl {

// ---------------------------------------------------------------------------
// One forward step:
//   gates (rows, 4H): pre-activations in; sigmoid(i), sigmoid(f), tanh(g),
//     sigmoid(o) out, in place;
//   c_state (rows, H): c_{t-1} in, c_t = f * c_{t-1} + i * g out, in place;
//   cells (rows, H): c_t out;
//   h_out (rows, H): o * tanh(c_t) out;
//   h_state (rows, H) or nullptr: the same values as h_out, written again
//     (the recurrent state when no projection follows).
cudaError_t lstm_forward_step(float* gates, float* c_state, float* cells, float* h_out, float* h_state,
                              int64_t rows, int64_t H, cudaStream_t stream);
cudaError_t lstm_forward_step(double* gates, double* c_state, double* cells, double* h_out, double* h_state,
                              int64_t rows, int64_t H, cudaStream_t stream);
cudaError_t lstm_forward_step(__half* gates, __half* c_state, __half* cells, __half* h_out, __half* h_state,
                              int64_t rows, int64_t H, cudaStream_t stream);
cudaError_t lstm_forward_step(__nv_bfloat16* gates, __nv_bfloat16* c_state, __nv_bfloat16* cells,
                              __nv_bfloat16* h_out, __nv_bfloat16* h_state, int64_t rows, int64_t H,
                              cudaStream_t stream);

// ---------------------------------------------------------------------------
// One backward step, from what the forward step saved:
//   gates (rows, 4H): the activations i, f, g, o (forward's output gates);
//   cells (rows, H): c_t;
//   c_prev (rows_with_prev, H): c_{t-1} of rows 0..rows_with_prev-1; nullptr
//     allowed when rows_with_prev == 0;
//   c0 (>= rows, H): c_{t-1} of rows rows_with_prev..rows-1 (those whose first
//     step this is), read at the same row index; nullptr allowed when
//     rows_with_prev == rows;
//   dh_a (rows, H), dh_b (rows, H) or nullptr: the gradient w.r.t.
//     o * tanh(c_t) is dh_a + dh_b;
//   dc_state (rows, H): gradient w.r.t. c_t in, w.r.t. c_{t-1} out, in place;
//   grad_gates (rows, 4H): gradient w.r.t. the pre-activations out, same
//     layout as gates;
//   h_tilde (rows, H) or nullptr: o * tanh(c_t) out (the input of a
//     projection, which the caller needs for its weight gradient).
// Needs 0 <= rows_with_prev <= rows.
cudaError_t lstm_backward_step(const float* gates, const float* cells, const float* c_prev,
                               int64_t rows_with_prev, const float* c0, const float* dh_a, const float* dh_b,
                               float* dc_state, float* grad_gates, float* h_tilde, int64_t rows, int64_t H,
                               cudaStream_t stream);
cudaError_t lstm_backward_step(const double* gates, const double* cells, const double* c_prev,
                               int64_t rows_with_prev, const double* c0, const double* dh_a, const double* dh_b,
                               double* dc_state, double* grad_gates, double* h_tilde, int64_t rows, int64_t H,
                               cudaStream_t stream);
cudaError_t lstm_backward_step(const __half* gates, const __half* cells, const __half* c_prev,
                               int64_t rows_with_prev, const __half* c0, const __half* dh_a, const __half* dh_b,
                               __half* dc_state, __half* grad_gates, __half* h_tilde, int64_t rows, int64_t H,
                               cudaStream_t stream);
cudaError_t lstm_backward_step(const __nv_bfloat16* gates, const __nv_bfloat16* cells,
                               const __nv_bfloat16* c_prev, int64_t rows_with_prev, const __nv_bfloat16* c0,
                               const __nv_bfloat16* dh_a, const __nv_bfloat16* dh_b, __nv_bfloat16* dc_state,
                               __nv_bfloat16* grad_gates, __nv_bfloat16* h_tilde, int64_t rows, int64_t H,
                               cudaStream_t stream);

}  // namespace cuda_impl
}  // namespace fastnlp
