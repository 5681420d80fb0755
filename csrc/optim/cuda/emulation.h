// The emulation of a CUDA launch on the CPU, for the optimizer kernels' tests on machines without
// a GPU. setup.py compiles the .cu files of optim/cuda with the host compiler and
// FASTOPT_CUDA_EMULATION into fastopt/_C_cuda_emulation (loaded by the tests only).
//
// The emulation is exact for kernels whose threads never communicate: no shared memory, no
// barriers, no warp shuffles, no atomics (the optimizer kernels use none; a kernel that did would
// not compile here, those names being undefined). Each thread then runs to completion
// independently, so running every thread of every block in turn gives the results of any GPU
// schedule. What a GPU would fault on is checked instead: a misaligned vector access.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>  // for the host compiler: __global__, __device__ etc. as plain C++
#include <vector_types.h>

#include <algorithm>
#include <cstdint>

#define __launch_bounds__(...)

// The built-in index variables of the running thread.
inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local uint3 blockDim;
inline thread_local uint3 gridDim;

namespace fastopt::cuda {

// CUDA's device-side min and max overloads.
using std::max;
using std::min;

namespace emulation {

// CPU tensors need no device switch.
struct DeviceGuard {
  explicit DeviceGuard(at::Device) {}
};

// The GPU faults on a vector load or store of `bytes` bytes at an address that is not a
// multiple of `bytes`.
inline void check_vector_access(const void* address, int bytes) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(address) % bytes == 0,
              "fastopt CUDA emulation: misaligned ", bytes, "-byte access at ", address,
              " (a GPU faults with 'misaligned address')");
}

template <typename... Params, typename... Args>
void run_grid(void (*kernel)(Params...), int64_t blocks, int threads, const Args&... args) {
  TORCH_CHECK(threads > 0 && threads <= 1024, "fastopt CUDA emulation: ", threads,
              " threads per block is outside CUDA's limit of 1024");
  gridDim = uint3{static_cast<unsigned>(blocks), 1, 1};
  blockDim = uint3{static_cast<unsigned>(threads), 1, 1};
  for (int64_t block = 0; block < blocks; ++block) {
    blockIdx = uint3{static_cast<unsigned>(block), 0, 0};
    for (int thread = 0; thread < threads; ++thread) {
      threadIdx = uint3{static_cast<unsigned>(thread), 0, 0};
      kernel(args...);
    }
  }
}

}  // namespace emulation
}  // namespace fastopt::cuda
