// The multi-tensor optimizer ops on CUDA: every rule of the op table (optim/step_ops.h) run by
// the CUDA driver, its kernels compiled per rule (optim/cuda/step_kernels.cuh).
#include <torch/library.h>

#include "optim/cuda/step_kernels.cuh"
#include "optim/step_ops.h"

namespace fastopt::cuda {

FASTOPT_CUDA_KERNELS_IMPL(m) {
  StepRules::for_each([&m](auto rule) {
    using Rule = decltype(rule);
    m.impl(unqualified_op_name(Rule::kOpName),
           &StepOp<Rule>::template kernel<run_step_on_cuda<Rule>>);
  });
}

}  // namespace fastopt::cuda
