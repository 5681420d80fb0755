// fastopt::adam_step_ on the CPU: the multi-tensor driver with Adam's rule.
#include <torch/library.h>

#include "optim/adam_rule.h"
#include "cpu/isa.h"
#include "optim/cpu/multi_tensor_step.h"

namespace fastopt::cpu {
namespace {

FASTOPT_DISPATCH_BY_ISA(adam_piece, step_piece_body<AdamRule>, StepPiece<AdamRule>)

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adam_step_", &adam_step<run_step_on_cpu<AdamRule, adam_piece>>);
}

}  // namespace fastopt::cpu
