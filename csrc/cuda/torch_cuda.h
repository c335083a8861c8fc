// The torch CUDA API that the bindings (csrc/cuda/*_binding.cpp) use.
//
// When the test suite runs the bindings on the CPU (FASTNLP_CUDA_EMULATION,
// see launch.h), it force-includes stand-ins for all of this instead
// (python_tests/cuda_emulation/torch_stand_ins.h): a guard and a stream that
// do nothing, a C10_CUDA_CHECK that also reports the emulator's faults,
// is_cuda_tensor() true for CPU tensors, on which the emulated kernels run,
// and a run_on_two_streams that runs its two pieces of work in turn.
#pragma once

#ifndef FASTNLP_CUDA_EMULATION
// c10's CUDA headers only, not ATen/cuda/CUDAContext.h: the bindings need
// no cuBLAS, and so python_tests/test_build.py can compile them against the
// headers a CPU-only torch wheel ships (with the CUDA toolkit's runtime
// headers) on a machine without a GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>
#include <cstdint>
#include <vector>

namespace fastnlp {

// Whether t lives where the bindings' kernels run.
inline bool is_cuda_tensor(const at::Tensor& t) { return t.is_cuda(); }

// `values` as an int64 tensor on `device`, copied from pinned memory without
// waiting for the current stream (the host allocator keeps the pinned block
// until the copy is done).
inline at::Tensor copy_to_device(const std::vector<int64_t>& values, const c10::Device& device) {
  const at::Tensor host = at::tensor(values, at::kLong).pin_memory();
  return host.to(device, /*non_blocking=*/true);
}

// Makes `waiting` wait for the work queued on `queued` so far.
inline void wait_for_stream(cudaStream_t waiting, cudaStream_t queued) {
  cudaEvent_t event;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  C10_CUDA_CHECK(cudaEventRecord(event, queued));
  C10_CUDA_CHECK(cudaStreamWaitEvent(waiting, event, 0));
  // The wait holds on to the recorded work; CUDA frees the event once it completes.
  C10_CUDA_CHECK(cudaEventDestroy(event));
}

// Runs work(0) and work(1) each on a stream of torch's pool, so that their
// kernels can overlap on the GPU; each first waits for what the current
// stream has queued, and the current stream then waits for both. Returns
// what they return. Those tensors were allocated on the side streams: each is
// recorded as used by the current stream, or the caching allocator could
// hand its memory to the side stream again while work queued later on the
// current stream still reads it.
template <typename Work>
std::array<std::vector<at::Tensor>, 2> run_on_two_streams(const Work& work) {
  const c10::cuda::CUDAStream current = c10::cuda::getCurrentCUDAStream();
  std::array<std::vector<at::Tensor>, 2> results;
  for (int64_t k = 0; k < 2; ++k) {
    const c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
    wait_for_stream(side, current);
    {
      const c10::cuda::CUDAStreamGuard on_side(side);
      results[k] = work(k);
    }
    wait_for_stream(current, side);
    for (const at::Tensor& t : results[k])
      if (t.defined()) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), current);
  }
  return results;
}

}  // namespace fastnlp
#endif
