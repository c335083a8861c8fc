// The torch CUDA API that the bindings (csrc/cuda/*_binding.cpp) use.
//
// When the test suite runs the bindings on the CPU (FASTNLP_CUDA_EMULATION,
// see launch.h), it force-includes stand-ins for all of this instead
// (python_tests/cuda_emulation/torch_stand_ins.h): a guard and a stream that
// do nothing, a C10_CUDA_CHECK that also reports the emulator's faults, and
// is_cuda_tensor() true for CPU tensors, on which the emulated kernels run.
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

namespace fastnlp {

// Whether t lives where the bindings' kernels run.
inline bool is_cuda_tensor(const at::Tensor& t) { return t.is_cuda(); }

}  // namespace fastnlp
#endif
