// The multi-tensor optimizer ops on meta tensors, which is how torch.compile and FakeTensor trace
// them: the checks every device runs (check_step_call), and nothing else. So an op's argument
// checks live once, in C++, for eager calls and traced ones alike.
#include <torch/library.h>

#include "optim/step_ops.h"

namespace fastopt {
namespace {

template <typename Rule>
void check_on_meta(const StepCall<Rule>& call) {
  check_step_call(call, c10::DeviceType::Meta);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, Meta, m) {
  StepRules::for_each([&m](auto rule) {
    using Rule = decltype(rule);
    m.impl(Rule::kOpName, &StepOp<Rule>::template kernel<check_on_meta<Rule>>);
  });
}

}  // namespace fastopt
