// The multi-tensor optimizer ops on the CPU: every rule of the op table (optim/step_ops.h) run
// by the CPU driver, its element loops compiled per instruction set (optim/cpu/step_pieces.h).
#include "optim/step_ops.h"

#include <torch/library.h>

#include "optim/cpu/multi_tensor_step.h"
#include "optim/cpu/step_pieces.h"

namespace fastopt::cpu {

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  StepRules::for_each([&m](auto rule) {
    using Rule = decltype(rule);
    m.impl(Rule::kOpName,
           &StepOp<Rule>::template kernel<run_step_on_cpu<Rule, &StepPieces<Rule>::piece>>);
  });
}

}  // namespace fastopt::cpu
