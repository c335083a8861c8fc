// How the CUDA kernels are launched and reach their dynamic shared memory.
//
// Every launch in csrc/cuda goes through launch_kernel and every kernel finds
// its dynamic shared memory through dynamic_shared_memory(), rather than
// writing <<<...>>> and `extern __shared__` itself. Those two are the only
// constructs of the kernels that a C++ compiler cannot take, so with them
// behind these functions the test suite can compile the unchanged .cu files
// as C++ and run every kernel on the CPU: it defines FASTNLP_CUDA_EMULATION
// and supplies both functions itself (python_tests/cuda_emulation). Nothing
// else changes for a real build.
#pragma once

#include <cstddef>

#include <cuda_runtime_api.h>

#ifndef FASTNLP_CUDA_EMULATION
namespace fastnlp {
namespace cuda_impl {

// kernel<<<grid, block, smem, stream>>>(args...); the launch's own error is
// left for cudaGetLastError, as with <<<...>>>.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                   const Args&... args) {
  kernel<<<grid, block, smem, stream>>>(args...);
}

// The block's dynamic shared memory (the launch's `smem` bytes), 16-byte aligned.
__device__ __forceinline__ unsigned char* dynamic_shared_memory() {
  extern __shared__ __align__(16) unsigned char fastnlp_dynamic_shared_memory[];
  return fastnlp_dynamic_shared_memory;
}

}  // namespace cuda_impl
}  // namespace fastnlp
#endif
