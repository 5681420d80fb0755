// fastopt::adadelta_step_ on CUDA: the multi-tensor driver with Adadelta's rule.
#include <torch/library.h>

#include "optim/adadelta_rule.h"
#include "optim/cuda/multi_tensor_step.cuh"

namespace fastopt::cuda {

FASTOPT_CUDA_KERNELS_IMPL(m) {
  m.impl("adadelta_step_", &adadelta_step<run_step_on_cuda<AdadeltaRule>>);
}

}  // namespace fastopt::cuda
