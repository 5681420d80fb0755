// Advances every param's step counter by one, on the device, unless found_inf says the step
// was skipped. Runs after the update kernels, which read the old counts.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <vector>

namespace fastopt::cuda {

constexpr int kMaxStepsPerLaunch = 256;

struct StepCounters {
  float* steps[kMaxStepsPerLaunch];
  int count;
};

static __global__ void increment_steps_kernel(const __grid_constant__ StepCounters counters,
                                              const float* found_inf) {
  const int i = threadIdx.x;
  if (i >= counters.count || (found_inf != nullptr && *found_inf != 0.0f)) return;
  *counters.steps[i] += 1.0f;
}

inline void increment_steps(const std::vector<at::Tensor>& steps, const float* found_inf) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  StepCounters counters;
  counters.count = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    counters.steps[counters.count++] = steps[i].data_ptr<float>();
    if (counters.count == kMaxStepsPerLaunch || i + 1 == steps.size()) {
      increment_steps_kernel<<<1, kMaxStepsPerLaunch, 0, stream>>>(counters, found_inf);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      counters.count = 0;
    }
  }
}

}  // namespace fastopt::cuda
