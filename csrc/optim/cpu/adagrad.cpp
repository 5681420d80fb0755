// fastopt::adagrad_step_ on the CPU: the multi-tensor driver with Adagrad's rule.
#include <torch/library.h>

#include "optim/adagrad_rule.h"
#include "cpu/isa.h"
#include "optim/cpu/multi_tensor_step.h"

namespace fastopt::cpu {
namespace {

FASTOPT_DISPATCH_BY_ISA(adagrad_piece, step_piece_body<AdagradRule>, StepPiece<AdagradRule>)

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adagrad_step_", &adagrad_step<run_step_on_cpu<AdagradRule, adagrad_piece>>);
}

}  // namespace fastopt::cpu
