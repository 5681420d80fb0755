// The multi-tensor optimizer ops on CUDA: every rule of the op table (optim/step_ops.h) run by
// the CUDA driver.
#include <torch/library.h>

#include "optim/cuda/multi_tensor_step.cuh"
#include "optim/step_ops.h"

namespace fastopt::cuda {

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  StepRules::for_each([&m](auto rule) {
    using Rule = decltype(rule);
    m.impl(Rule::kOpName, &StepOp<Rule>::template kernel<run_step_on_cuda<Rule>>);
  });
}

}  // namespace fastopt::cuda
