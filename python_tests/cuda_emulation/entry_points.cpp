// C entry points to the emulated CUDA launchers, for ctypes
// (python_tests/test_cuda_emulated.py). Each takes the launcher's raw
// pointers (host memory here) plus a dtype code, and returns its cudaError_t,
// or -1 when the emulation itself found a fault (emu_take_failure says which).
#include <cstdint>
#include <string>

#include "cuda/crf.h"
#include "cuda/lstm_step.h"
#include "emulator.h"

// The emulation's own fault of the last call, for emu_take_failure.
static std::string last_failure;

// What an entry point returns: the launcher's error, or -1 when the
// emulation found a fault during the call (kept for emu_take_failure).
int emu_finish(cudaError_t error) {
  const std::string failure = fastnlp_emulation::take_failure();
  if (!failure.empty()) {
    last_failure = failure;
    return -1;
  }
  return static_cast<int>(error);
}

namespace {

namespace kern = ::fastnlp::cuda_impl;

// dtype codes: the element type of every floating pointer of one call.
enum Dtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// -2: a dtype code the launcher does not take.
template <typename F>
int with_type(int dtype, const F& f) {
  switch (dtype) {
    case kFloat32:
      return emu_finish(f(float{}));
    case kFloat64:
      return emu_finish(f(double{}));
    case kFloat16:
      return emu_finish(f(__half{}));
    case kBFloat16:
      return emu_finish(f(__nv_bfloat16{}));
    default:
      return -2;
  }
}

// The CRF kernels take float and double only.
template <typename F>
int with_float_type(int dtype, const F& f) {
  switch (dtype) {
    case kFloat32:
      return emu_finish(f(float{}));
    case kFloat64:
      return emu_finish(f(double{}));
    default:
      return -2;
  }
}

template <typename T>
T* as(void* p) {
  return static_cast<T*>(p);
}
template <typename T>
const T* as(const void* p) {
  return static_cast<const T*>(p);
}

}  // namespace

extern "C" {

const char* emu_take_failure() {
  static std::string taken;
  taken = last_failure;
  last_failure.clear();
  return taken.c_str();
}

void emu_set_seed(uint64_t seed) { fastnlp_emulation::set_seed(seed); }

int emu_lstm_forward_step(int dtype, void* gates, void* c_state, void* cells, void* h_out, void* h_state,
                          const void* zoneout_cell, const void* zoneout_hidden, int64_t rows, int64_t H,
                          void* norm_hh, const void* ln_hh_weight, const void* ln_hh_bias,
                          const void* ln_cell_weight, const void* ln_cell_bias, void* ln_stats) {
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    kern::LstmForwardStepArgs<T> a{as<T>(gates),        as<T>(c_state),       as<T>(cells), as<T>(h_out),
                                   as<T>(h_state),      as<T>(zoneout_cell), as<T>(zoneout_hidden),
                                   rows,                H};
    a.norm_hh = as<T>(norm_hh);
    a.ln_hh_weight = as<T>(ln_hh_weight);
    a.ln_hh_bias = as<T>(ln_hh_bias);
    a.ln_cell_weight = as<T>(ln_cell_weight);
    a.ln_cell_bias = as<T>(ln_cell_bias);
    a.ln_stats = static_cast<kern::ln_stat_t<T>*>(ln_stats);
    return kern::lstm_forward_step(a, nullptr);
  });
}

int emu_lstm_backward_step(int dtype, const void* gates, const void* c_prev, int64_t rows_with_prev,
                           const void* c0, const void* dh_a, const void* dh_b, void* dc_state, void* grad_gates,
                           void* h_tilde, const void* zoneout_cell, const void* zoneout_hidden,
                           void* grad_h_prev, int64_t rows, int64_t H, const void* norm_hh,
                           const void* ln_stats, const void* ln_hh_weight, const void* ln_cell_weight,
                           const void* ln_cell_bias, void* grad_rec, void* grad_ln_cell) {
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    kern::LstmBackwardStepArgs<T> a{as<T>(gates),          as<T>(c_prev),    rows_with_prev,
                                    as<T>(c0),             as<T>(dh_a),      as<T>(dh_b),
                                    as<T>(dc_state),       as<T>(grad_gates), as<T>(h_tilde),
                                    as<T>(zoneout_cell),   as<T>(zoneout_hidden), as<T>(grad_h_prev),
                                    rows,                  H};
    a.norm_hh = as<T>(norm_hh);
    a.ln_stats = static_cast<const kern::ln_stat_t<T>*>(ln_stats);
    a.ln_hh_weight = as<T>(ln_hh_weight);
    a.ln_cell_weight = as<T>(ln_cell_weight);
    a.ln_cell_bias = as<T>(ln_cell_bias);
    a.grad_rec = as<T>(grad_rec);
    a.grad_ln_cell = as<T>(grad_ln_cell);
    return kern::lstm_backward_step(a, nullptr);
  });
}

int emu_lstm_sequence_forward(int dtype, const int64_t* offsets, int64_t steps, int64_t batch, int64_t H,
                              int reverse, void* gates, void* c_state, void* h_state, void* cells, void* output,
                              const void* weight_hh, const void* recurrent_mask, const void* zoneout_cell,
                              const void* zoneout_hidden) {
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    const kern::LstmSequenceForwardArgs<T> a{offsets,           steps,           batch,
                                             H,                 reverse != 0,    as<T>(gates),
                                             as<T>(c_state),    as<T>(h_state),  as<T>(cells),
                                             as<T>(output),     as<T>(weight_hh), as<T>(recurrent_mask),
                                             as<T>(zoneout_cell), as<T>(zoneout_hidden)};
    return kern::lstm_sequence_forward(a, nullptr);
  });
}

int emu_lstm_sequence_backward(int dtype, const int64_t* offsets, int64_t steps, int64_t batch, int64_t H,
                               int reverse, const void* gates, const void* cells, const void* output,
                               const void* h0, const void* c0, const void* grad_output, void* dh_state,
                               void* dc_state, void* grad_gates, void* h_prev, const void* weight_hh,
                               const void* recurrent_mask, const void* zoneout_cell, const void* zoneout_hidden,
                               void* grad_h_zoneout) {
  return with_type(dtype, [&](auto tag) {
    using T = decltype(tag);
    const kern::LstmSequenceBackwardArgs<T> a{offsets,
                                              steps,
                                              batch,
                                              H,
                                              reverse != 0,
                                              as<T>(gates),
                                              as<T>(cells),
                                              as<T>(output),
                                              as<T>(h0),
                                              as<T>(c0),
                                              as<T>(grad_output),
                                              as<T>(dh_state),
                                              as<T>(dc_state),
                                              as<T>(grad_gates),
                                              as<T>(h_prev),
                                              as<T>(weight_hh),
                                              as<T>(recurrent_mask),
                                              as<T>(zoneout_cell),
                                              as<T>(zoneout_hidden),
                                              as<T>(grad_h_zoneout)};
    return kern::lstm_sequence_backward(a, nullptr);
  });
}

int emu_lstm_sequence_kernels_fit(int64_t H, int64_t compute_bytes) {
  return kern::lstm_sequence_kernels_fit(H, static_cast<size_t>(compute_bytes)) ? 1 : 0;
}

int64_t emu_crf_log_partition_workspace_bytes(int64_t B, int64_t K, int64_t scalar_bytes) {
  return kern::crf_log_partition_workspace_bytes(B, K, scalar_bytes);
}

int64_t emu_crf_log_partition_backward_workspace_bytes(int64_t B, int64_t K, int64_t scalar_bytes) {
  return kern::crf_log_partition_backward_workspace_bytes(B, K, scalar_bytes);
}

int64_t emu_crf_viterbi_workspace_bytes(int64_t B, int64_t T, int64_t K, int64_t scalar_bytes) {
  return kern::crf_viterbi_workspace_bytes(B, T, K, scalar_bytes);
}

int64_t emu_crf_viterbi_topk_workspace_bytes(int64_t B, int64_t T, int64_t K, int64_t k, int64_t scalar_bytes) {
  return kern::crf_viterbi_topk_workspace_bytes(B, T, K, k, scalar_bytes);
}

int emu_crf_log_partition(int dtype, const void* emissions, const bool* mask, const int64_t* tags,
                          const void* start, const void* end, const void* transitions, int64_t B, int64_t T,
                          int64_t K, void* log_partition, void* alpha, void* workspace) {
  return with_float_type(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    return kern::crf_log_partition(as<T_>(emissions), mask, tags, as<T_>(start), as<T_>(end), as<T_>(transitions),
                                   B, T, K, as<T_>(log_partition), as<T_>(alpha), workspace, nullptr);
  });
}

int emu_crf_log_partition_backward(int dtype, const void* grad_log_partition, const void* emissions,
                                   const bool* mask, const int64_t* tags, const void* end, const void* transitions,
                                   const void* alpha, const void* log_partition, int64_t B, int64_t T, int64_t K,
                                   void* grad_emissions, void* grad_start, void* grad_end, void* grad_transitions,
                                   void* workspace) {
  return with_float_type(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    return kern::crf_log_partition_backward(as<T_>(grad_log_partition), as<T_>(emissions), mask, tags, as<T_>(end),
                                            as<T_>(transitions), as<T_>(alpha), as<T_>(log_partition), B, T, K,
                                            as<T_>(grad_emissions), as<T_>(grad_start), as<T_>(grad_end),
                                            as<T_>(grad_transitions), workspace, nullptr);
  });
}

int emu_crf_viterbi(int dtype, const void* emissions, const bool* mask, const void* start, const void* end,
                    const void* transitions, int64_t B, int64_t T, int64_t K, int64_t* paths, void* scores,
                    void* workspace) {
  return with_float_type(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    return kern::crf_viterbi(as<T_>(emissions), mask, as<T_>(start), as<T_>(end), as<T_>(transitions), B, T, K,
                             paths, as<T_>(scores), workspace, nullptr);
  });
}

int emu_crf_viterbi_topk(int dtype, const void* emissions, const bool* mask, const void* start, const void* end,
                         const void* transitions, int64_t B, int64_t T, int64_t K, int64_t k, int64_t* paths,
                         void* scores, void* workspace) {
  return with_float_type(dtype, [&](auto tag) {
    using T_ = decltype(tag);
    return kern::crf_viterbi_topk(as<T_>(emissions), mask, as<T_>(start), as<T_>(end), as<T_>(transitions), B, T,
                                  K, k, paths, as<T_>(scores), workspace, nullptr);
  });
}

}  // extern "C"
