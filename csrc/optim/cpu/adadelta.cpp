// fastopt::adadelta_step_ on the CPU: the multi-tensor driver with Adadelta's rule.
#include <torch/library.h>

#include "optim/adadelta_rule.h"
#include "cpu/isa.h"
#include "optim/cpu/multi_tensor_step.h"

namespace fastopt::cpu {
namespace {

FASTOPT_DISPATCH_BY_ISA(adadelta_piece, step_piece_body<AdadeltaRule>, StepPiece<AdadeltaRule>)

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adadelta_step_", &adadelta_step<run_step_on_cpu<AdadeltaRule, adadelta_piece>>);
}

}  // namespace fastopt::cpu
