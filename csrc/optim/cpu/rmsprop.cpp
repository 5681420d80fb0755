// fastopt::rmsprop_step_ on the CPU: the multi-tensor driver with Rmsprop's rule.
#include <torch/library.h>

#include "optim/rmsprop_rule.h"
#include "cpu/isa.h"
#include "optim/cpu/multi_tensor_step.h"

namespace fastopt::cpu {
namespace {

FASTOPT_DISPATCH_BY_ISA(rmsprop_piece, step_piece_body<RmspropRule>, StepPiece<RmspropRule>)

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("rmsprop_step_", &rmsprop_step<run_step_on_cpu<RmspropRule, rmsprop_piece>>);
}

}  // namespace fastopt::cpu
