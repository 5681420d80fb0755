// fastopt::rmsprop_step_ on CUDA: the multi-tensor driver with Rmsprop's rule.
#include <torch/library.h>

#include "optim/cuda/multi_tensor_step.cuh"
#include "optim/rmsprop_rule.h"

namespace fastopt::cuda {

FASTOPT_CUDA_KERNELS_IMPL(m) {
  m.impl("rmsprop_step_", &rmsprop_step<run_step_on_cuda<RmspropRule>>);
}

}  // namespace fastopt::cuda
