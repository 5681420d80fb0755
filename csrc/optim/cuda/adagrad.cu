// fastopt::adagrad_step_ on CUDA: the multi-tensor driver with Adagrad's rule.
#include <torch/library.h>

#include "optim/adagrad_rule.h"
#include "optim/cuda/multi_tensor_step.cuh"

namespace fastopt::cuda {

FASTOPT_CUDA_KERNELS_IMPL(m) {
  m.impl("adagrad_step_", &adagrad_step<run_step_on_cuda<AdagradRule>>);
}

}  // namespace fastopt::cuda
