// Runs fastnlp's CUDA kernels on the CPU, for the test suite on machines
// without a GPU (python_tests/test_cuda_emulated.py builds and loads it).
//
// The .cu files under csrc/cuda are compiled unchanged as C++ with this
// header force-included (g++ -include) and FASTNLP_CUDA_EMULATION defined,
// which makes csrc/cuda/launch.h leave launch_kernel and
// dynamic_shared_memory to this header. It emulates what those kernels use of
// the CUDA execution model, and checks what a GPU would not:
//
//  * the grid runs one block at a time, each thread of the block a fiber (its
//    own stack, switched on one OS thread), so threadIdx/blockIdx/blockDim/
//    gridDim are those of the fiber running now;
//  * __syncthreads() and __syncthreads_or() wait until every thread of the
//    block is there; a thread that has returned while others wait is
//    reported as a divergent barrier (undefined behaviour on a GPU), as is a
//    deadlock;
//  * __shfl_xor_sync / __shfl_down_sync exchange values within a full warp of
//    32 lanes (the only kind the kernels use; anything else is reported);
//  * between two barriers the threads of a block run one at a time, in a
//    random order (seeded; see run_block in emulator.cpp), so a kernel that
//    reads what another thread writes without a barrier between them gives
//    order-dependent results. A thread runs uninterrupted from one barrier
//    or shuffle to the next, so a lost update of an unsynchronised
//    read-modify-write inside such a stretch does not show;
//  * `static` storage serves __shared__ variables (one block runs at a
//    time), filled with 0xff bytes (NaN for floating types) before each
//    block, where a GPU leaves them undefined: a read before any thread of
//    the block wrote one gives NaN, not the last block's value. The dynamic
//    shared memory is exactly the launch's `smem` bytes, filled the same
//    way, between guards that must be intact when the block ends;
//  * a launch with a configuration that CUDA refuses (no threads, more than
//    1024 per block, more than 48 KB of dynamic shared memory without an
//    opt-in, an empty grid) runs nothing and sets the error that
//    cudaGetLastError() returns, as a GPU launch would.
//
// Not emulated: memory spaces (device pointers are host pointers here: an
// access outside a buffer is caught only in the sanitized run,
// python_tests/run_emulated_sanitized.py, by ASan; the tests fill outputs
// with NaN so that an element a kernel fails to write shows), streams (a launch runs
// to completion before it returns), the memory model, warp-synchronous
// timing, __launch_bounds__ (defined away: a launch above a kernel's bound
// is not refused) and static shared memory's share of the 48 KB. Host math (expf, tanhf, ...) replaces the
// device's, whose results may differ in the last ulp.
#pragma once

// Before the CUDA headers, which keep a __shared__ that is already defined.
// The section gathers every __shared__ variable of the library in one range
// (between the linker's __start_ and __stop_ symbols for it), which
// run_grid fills with kFillByte before each block.
#define __shared__ static __attribute__((section("fastnlp_emulated_shared")))

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>

#define __launch_bounds__(...)

// The launchers' cudaGetLastError() is the emulator's: renamed, since a
// process whose torch is a CUDA build has the real CUDA runtime loaded, whose
// symbol would otherwise win (and answer "no driver" here).
#define cudaGetLastError fastnlp_emulation_cuda_get_last_error
cudaError_t fastnlp_emulation_cuda_get_last_error();

namespace fastnlp_emulation {

struct Coordinates {
  uint3 thread;
  uint3 block;
  dim3 block_dim;
  dim3 grid_dim;
};

// The coordinates of the thread that runs now.
const Coordinates& current();

// __syncthreads().
void sync_block();

// __syncthreads_or(predicate): nonzero when any thread's predicate is.
int sync_block_or(int predicate);

// Every lane of the calling thread's warp offers `value` (bytes <= 8) and
// receives into `out` the value that lane `source_lane` offered.
void exchange_in_warp(unsigned mask, const void* value, void* out, size_t bytes, unsigned source_lane);

// Lane of the calling thread within its warp.
unsigned lane();

// The running block's dynamic shared memory.
unsigned char* dynamic_shared_memory();

// Runs body() for every thread of the grid (see above); a refused launch
// sets the error for cudaGetLastError() instead.
void run_grid(dim3 grid, dim3 block, size_t smem, const std::function<void()>& body);

// How many launches run_grid has taken (refused ones included): lets a test
// see which kernels a binding chose.
uint64_t launch_count();

// What went wrong in the emulation itself since the last call (a divergent
// barrier, a deadlock, a write past the dynamic shared memory, ...), or an
// empty string; reading it clears it.
const char* take_failure();

// Seeds the order in which the threads of a block run between barriers.
void set_seed(uint64_t seed);

}  // namespace fastnlp_emulation

#define threadIdx (::fastnlp_emulation::current().thread)
#define blockIdx (::fastnlp_emulation::current().block)
#define blockDim (::fastnlp_emulation::current().block_dim)
#define gridDim (::fastnlp_emulation::current().grid_dim)

inline void __syncthreads() { fastnlp_emulation::sync_block(); }
inline int __syncthreads_or(int predicate) { return fastnlp_emulation::sync_block_or(predicate); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a word or two");
  T out;
  const unsigned source = width == 32 ? fastnlp_emulation::lane() ^ static_cast<unsigned>(lane_mask) : ~0u;
  fastnlp_emulation::exchange_in_warp(mask, &value, &out, sizeof(T), source);
  return out;
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a word or two");
  T out;
  const unsigned me = fastnlp_emulation::lane();
  // A source past the end of the warp leaves a lane its own value.
  const unsigned source = width != 32 ? ~0u : me + delta < 32 ? me + delta : me;
  fastnlp_emulation::exchange_in_warp(mask, &value, &out, sizeof(T), source);
  return out;
}

namespace fastnlp {
namespace cuda_impl {

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/,
                   const Args&... args) {
  // Converted to the parameter types once, as a launch copies its arguments.
  const std::tuple<std::decay_t<Params>...> params(args...);
  fastnlp_emulation::run_grid(grid, block, smem, [&] { std::apply(kernel, params); });
}

inline unsigned char* dynamic_shared_memory() { return fastnlp_emulation::dynamic_shared_memory(); }

}  // namespace cuda_impl
}  // namespace fastnlp
