// The multi-tensor optimizer ops on the CPU: every rule of the op table (optim/step_ops.h) run
// by the CPU driver, its element loop compiled per instruction set.
#include "optim/step_ops.h"

#include <torch/library.h>

#include "cpu/isa.h"
#include "optim/cpu/multi_tensor_step.h"

namespace fastopt::cpu {
namespace {

// step_piece_body<Rule> compiled for each instruction set, and `piece`, which runs the active one.
template <typename Rule>
struct StepPieces {
  FASTOPT_DISPATCH_BY_ISA(piece, step_piece_body<Rule>, StepPiece<Rule>)
};

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  StepRules::for_each([&m](auto rule) {
    using Rule = decltype(rule);
    m.impl(Rule::kOpName,
           &StepOp<Rule>::template kernel<run_step_on_cpu<Rule, &StepPieces<Rule>::piece>>);
  });
}

}  // namespace fastopt::cpu
