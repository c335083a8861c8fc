// Stand-ins for the torch CUDA API of csrc/cuda/torch_cuda.h, force-included
// (with emulator.h) when test_cuda_emulated.py builds the CUDA bindings for
// the CPU: tensors the bindings receive are CPU tensors, and their kernels
// run in the emulator.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <string>
#include <vector>

#include "emulator.h"

namespace c10 {
namespace cuda {
struct OptionalCUDAGuard {
  explicit OptionalCUDAGuard(const c10::Device&) {}
};
inline cudaStream_t getCurrentCUDAStream() { return nullptr; }
}  // namespace cuda
}  // namespace c10

namespace fastnlp {
inline bool is_cuda_tensor(const at::Tensor& t) { return t.is_cpu(); }

// The emulated kernels read host memory.
inline at::Tensor copy_to_device(const std::vector<int64_t>& values, const c10::Device&) {
  return at::tensor(values, at::kLong);
}

// One after the other: the emulator has no streams (each launch runs to
// completion before it returns), so there is nothing to overlap or order.
template <typename Work>
std::array<std::vector<at::Tensor>, 2> run_on_two_streams(const Work& work) {
  return {work(0), work(1)};
}
}  // namespace fastnlp

namespace fastnlp_emulation {
// What C10_CUDA_CHECK raises: a fault the emulator found in the launch, or
// the launcher's own error.
inline void check_call(cudaError_t error) {
  const std::string failure = take_failure();
  TORCH_CHECK(failure.empty(), "CUDA emulation: ", failure);
  TORCH_CHECK(error == cudaSuccess, "CUDA error ", static_cast<int>(error));
}
}  // namespace fastnlp_emulation

#define C10_CUDA_CHECK(expr) ::fastnlp_emulation::check_call(expr)
