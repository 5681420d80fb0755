// The op table of the multi-tensor optimizer ops: one update rule each. The CPU and CUDA kernel
// registrations, the autograd and in-place kernels and the fast eager entry points are all
// generated from this list (their schemas come from the matching table in fastopt/_step_ops.py;
// torch checks at import that each registered kernel fits its schema).
#pragma once

#include "optim/adadelta_rule.h"
#include "optim/adagrad_rule.h"
#include "optim/adam_rule.h"
#include "optim/rmsprop_rule.h"

namespace fastopt {

template <typename... Rules>
struct RuleList {
  // Calls f(Rule{}) for each rule, in order.
  template <typename F>
  static void for_each(const F& f) {
    (f(Rules{}), ...);
  }
};

using StepRules = RuleList<AdamRule, RmspropRule, AdagradRule, AdadeltaRule>;

}  // namespace fastopt
