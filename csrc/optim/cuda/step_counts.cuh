// Advances every param's step counter by one, on the device, unless found_inf says the step
// was skipped. Runs after the update kernels, which read the old counts.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "optim/cuda/launch.cuh"

namespace fastopt::cuda {

constexpr int kMaxStepsPerLaunch = 256;

struct StepCounters {
  float* steps[kMaxStepsPerLaunch];
  int count;
};

static __global__ void increment_steps_kernel(FASTOPT_KERNEL_PARAM(StepCounters) counters,
                                              const float* found_inf) {
  const int i = threadIdx.x;
  if (i >= counters.count || (found_inf != nullptr && *found_inf != 0.0f)) return;
  *counters.steps[i] += 1.0f;
}

inline void increment_steps(const std::vector<at::Tensor>& steps, const float* found_inf) {
  StepCounters counters;
  counters.count = 0;
  for (size_t i = 0; i < steps.size(); ++i) {
    counters.steps[counters.count++] = steps[i].data_ptr<float>();
    if (counters.count == kMaxStepsPerLaunch || i + 1 == steps.size()) {
      launch_kernel(&increment_steps_kernel, 1, kMaxStepsPerLaunch, counters, found_inf);
      counters.count = 0;
    }
  }
}

}  // namespace fastopt::cuda
