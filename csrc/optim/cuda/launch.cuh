// How the optimizer kernels are launched, and where they register. The product build launches
// them with <<<>>> on the current stream of the tensors' device. The emulation build
// (FASTOPT_CUDA_EMULATION: the host compiler on these same .cu files, for the tests of a machine
// without a GPU, see optim/cuda/emulation.h) runs every thread of every block in turn on the
// CPU, on CPU tensors. Everything else in the .cu files is shared, host and device code alike.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(FASTOPT_CUDA_EMULATION)
#include "optim/cuda/emulation.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fastopt::cuda {

// CUDA's limit on a grid's x dimension.
constexpr int64_t kMaxGridBlocks = 2147483647;

#if defined(FASTOPT_CUDA_EMULATION)
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CPU;
using DeviceGuard = emulation::DeviceGuard;
#define FASTOPT_CUDA_KERNELS_IMPL(m) TORCH_LIBRARY_IMPL(fastopt_cuda_emulation, CPU, m)
#define FASTOPT_SPARSE_CUDA_KERNELS_IMPL(m) TORCH_LIBRARY_IMPL(fastopt_cuda_emulation, SparseCPU, m)
// A large kernel parameter: read in place from the parameter space on the GPU; the emulation,
// which calls the kernel once per thread, passes a reference instead of a copy per thread.
#define FASTOPT_KERNEL_PARAM(T) const T&
using emulation::check_vector_access;
#else
constexpr c10::DeviceType kKernelDevice = c10::DeviceType::CUDA;
using DeviceGuard = c10::cuda::CUDAGuard;
#define FASTOPT_CUDA_KERNELS_IMPL(m) TORCH_LIBRARY_IMPL(fastopt, CUDA, m)
#define FASTOPT_SPARSE_CUDA_KERNELS_IMPL(m) TORCH_LIBRARY_IMPL(fastopt, SparseCUDA, m)
#define FASTOPT_KERNEL_PARAM(T) const __grid_constant__ T
// The GPU itself faults on a misaligned vector access.
__device__ __forceinline__ void check_vector_access(const void*, int) {}
#endif

// An op's name within its namespace ("adam_step_" of "fastopt::adam_step_"): the registrations
// above name the namespace themselves.
inline const char* unqualified_op_name(const char* qualified) {
  const char* separator = std::strstr(qualified, "::");
  return separator != nullptr ? separator + 2 : qualified;
}

// Launches `kernel` on `blocks` blocks (a 1-d grid) of `threads` threads, with no dynamic shared
// memory, on the current stream.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int64_t blocks, int threads, Args&&... args) {
  TORCH_CHECK(blocks > 0 && blocks <= kMaxGridBlocks, "fastopt: a kernel launch of ", blocks,
              " blocks is outside CUDA's grid limits");
#if defined(FASTOPT_CUDA_EMULATION)
  emulation::run_grid(kernel, blocks, threads, std::forward<Args>(args)...);
#else
  const unsigned int grid = blocks;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // clang-format off: it reads the launch's chevrons of a function pointer as template brackets
  kernel<<<grid, threads, 0, stream>>>(std::forward<Args>(args)...);
  // clang-format on
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace fastopt::cuda
