// fastopt::adam_step_ on CUDA: the multi-tensor driver with Adam's rule.
#include <torch/library.h>

#include "optim/adam_rule.h"
#include "optim/cuda/multi_tensor_step.cuh"

namespace fastopt::cuda {

FASTOPT_CUDA_KERNELS_IMPL(m) {
  m.impl("adam_step_", &adam_step<run_step_on_cuda<AdamRule>>);
}

}  // namespace fastopt::cuda
