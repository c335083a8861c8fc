// Small kernels with the faults the emulator must report (divergent barriers
// and shuffles, writes past the dynamic shared memory, shuffles it cannot
// emulate, refused launches) or expose (a missing barrier, a read of shared
// memory no thread wrote), and those that
// only the sanitizers stop (reads out of bounds, undefined behaviour; see
// python_tests/run_emulated_sanitized.py), so that test_cuda_emulated.py can
// check that its checks can fail.
#include <cstdint>

#include "emulator.h"

namespace {

using fastnlp::cuda_impl::dynamic_shared_memory;
using fastnlp::cuda_impl::launch_kernel;

__global__ void returns_before_a_barrier(int64_t* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void writes_past_shared_memory(int64_t bytes) { dynamic_shared_memory()[bytes + threadIdx.x] = 1; }

__global__ void writes_before_shared_memory() { dynamic_shared_memory()[-1 - static_cast<int64_t>(threadIdx.x)] = 1; }

__global__ void shuffles(int64_t* out, int skip_lane) {
  if (static_cast<int>(threadIdx.x % 32) == skip_lane) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, static_cast<int64_t>(threadIdx.x), 1);
}

// Thread 0 sums what the others wrote, with or without the barrier it needs.
__global__ void sums_shared(int64_t* out, int64_t launch, bool barrier) {
  __shared__ int64_t slots[64];
  slots[threadIdx.x] = launch * 1000 + threadIdx.x;
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) {
    int64_t sum = 0;
    for (int i = 0; i < 64; ++i) sum += slots[i];
    *out = sum;
  }
}

__global__ void writes_one(int64_t* out) { out[0] = 1; }

// Every thread reads a __shared__ slot that thread 0 writes only if `write`.
__global__ void reads_a_shared_slot(int64_t* out, bool write) {
  __shared__ int64_t slot;
  if (write && threadIdx.x == 0) slot = 5;
  __syncthreads();
  out[threadIdx.x] = slot;
}

// The sanitizers' faults: each copies what it reads to out[threadIdx.x].
__global__ void reads_a_buffer(int64_t* out, int64_t offset) { out[threadIdx.x] = out[offset + threadIdx.x]; }

// 64 bytes of dynamic shared memory, read from byte `offset` on.
__global__ void reads_shared_memory(int64_t* out, int64_t offset) {
  out[threadIdx.x] = dynamic_shared_memory()[offset + threadIdx.x];
}

// Through a pointer, as the kernels index their shared arrays: UBSan's
// object-size check stops the read (before ASan's red zone would).
__global__ void reads_a_shared_array(int64_t* out, int64_t offset) {
  __shared__ int64_t slots[32];
  slots[threadIdx.x] = 1;
  __syncthreads();
  const int64_t* first = slots;
  out[threadIdx.x] = first[offset + threadIdx.x];
}

// As the sequence kernels' per-row sums: a register array indexed by a row.
__global__ void indexes_a_local_array(int64_t* out, int64_t row) {
  int64_t sums[4] = {};
  sums[threadIdx.x % 4] = static_cast<int64_t>(threadIdx.x);
  out[threadIdx.x] = sums[row];
}

__global__ void converts_to_an_integer(int64_t* out, float value) { out[threadIdx.x] = static_cast<int64_t>(value); }

}  // namespace

// entry_points.cpp: the status a C entry point returns.
int emu_finish(cudaError_t error);

extern "C" {

// Runs fault `which` (see the switch) and returns what a caller would see:
// -1 if the emulation reported a fault (emu_take_failure says which), else
// cudaGetLastError() after the launch.
int emu_fault(int which, int64_t param, int64_t* out);

int emu_fault(int which, int64_t param, int64_t* out) {
  switch (which) {
    case 0:
      launch_kernel(returns_before_a_barrier, dim3(1), dim3(64), 0, nullptr, out);
      break;
    case 1:
      launch_kernel(writes_past_shared_memory, dim3(2), dim3(32), static_cast<size_t>(param), nullptr, param);
      break;
    case 2:  // a warp with lane `param` gone
      launch_kernel(shuffles, dim3(1), dim3(64), 0, nullptr, out, static_cast<int>(param));
      break;
    case 3:  // `param` threads: fewer than a warp
      launch_kernel(shuffles, dim3(1), dim3(static_cast<unsigned>(param)), 0, nullptr, out, -1);
      break;
    case 4:
    case 5:  // the sum with (5) and without (4) its barrier; param numbers the launch
      launch_kernel(sums_shared, dim3(1), dim3(64), 0, nullptr, out, param, which == 5);
      break;
    case 6:  // refused configurations: param selects one
      launch_kernel(writes_one, dim3(param == 0 ? 0 : 1), dim3(param == 1 ? 0 : param == 2 ? 1025 : 1),
                    param == 3 ? size_t(48 * 1024 + 1) : size_t(0), nullptr, out);
      break;
    case 7:
      launch_kernel(writes_before_shared_memory, dim3(1), dim3(32), static_cast<size_t>(param), nullptr);
      break;
    case 8:  // out[param .. param + 31]
      launch_kernel(reads_a_buffer, dim3(1), dim3(32), 0, nullptr, out, param);
      break;
    case 9:  // bytes param .. param + 31 of 64
      launch_kernel(reads_shared_memory, dim3(1), dim3(32), size_t(64), nullptr, out, param);
      break;
    case 10:  // elements param .. param + 31 of 32
      launch_kernel(reads_a_shared_array, dim3(1), dim3(32), 0, nullptr, out, param);
      break;
    case 11:  // element param of 4
      launch_kernel(indexes_a_local_array, dim3(1), dim3(32), 0, nullptr, out, param);
      break;
    case 12:  // param * 1e30, which no int64_t holds unless param is 0
      launch_kernel(converts_to_an_integer, dim3(1), dim3(32), 0, nullptr, out, static_cast<float>(param) * 1e30f);
      break;
    case 13:  // param: whether the slot is written first
      launch_kernel(reads_a_shared_slot, dim3(1), dim3(32), 0, nullptr, out, param != 0);
      break;
    default:
      return -2;
  }
  return emu_finish(cudaGetLastError());
}

}  // extern "C"
