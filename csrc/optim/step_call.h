// One call of a multi-tensor optimizer op, whatever its update rule, and its input checks.
//
// An optimizer is an update rule (optim/*_rule.h), a struct with:
//   kOpName: its op, "fastopt::<name>_step_" (listed in the op table, optim/step_ops.h);
//   kStateSlots, kStateNames[slot], kStateNeeds[slot]: its per-element state tensors (the op's
//       state lists in schema order), and the option without which a slot is unused ("" if
//       always used);
//   kVariants, uses_state(variant, slot): the kernel instantiations; a variant fixes which
//       state slots are read and written, since that changes the memory traffic;
//   Options, configure(own arguments...): its hyperparameters, made from the op's own arguments
//       (whose types, in schema order, are configure's parameters), with the variant;
//   Coefficients<C>, coefficients<C>(options, lr, step): what one tensor's update needs beyond
//       its elements, derived once per tensor and step;
//   update<VARIANT>(param, grad, state[kStateSlots], coefficients): the math of one element,
//       with the grad already unscaled.
// The op's signature and kernels follow from it (optim/step_op.h); the CPU driver
// (optim/cpu/multi_tensor_step.h) and the CUDA one (optim/cuda/multi_tensor_step.cuh) do
// everything else: checks, scheduling, unscaling, found_inf, step counts, a tensor lr.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <optional>
#include <vector>

#include "optim/optimizer_checks.h"

namespace fastopt {

template <typename Rule>
struct StepCall {
  const char* op;
  at::TensorList params;
  at::TensorList grads;
  std::array<at::TensorList, Rule::kStateSlots> states;  // empty where the variant has no use
  at::TensorList steps;
  int variant;
  typename Rule::Options options;
  double lr;  // unless lr_tensor is given
  std::optional<at::Tensor> lr_tensor;
  std::optional<at::Tensor> grad_scale;  // divide the grads by it, and store them back unscaled
  std::optional<at::Tensor> found_inf;   // nonzero: skip the step entirely
};

// Checks everything before anything changes: a failed check leaves params and state as they were.
template <typename Rule>
void check_step_call(const StepCall<Rule>& call, c10::DeviceType device_type) {
  std::vector<NamedTensorList> companions{{"grads", call.grads}};
  for (int slot = 0; slot < Rule::kStateSlots; ++slot) {
    if (Rule::uses_state(call.variant, slot)) {
      companions.emplace_back(Rule::kStateNames[slot], call.states[slot]);
    } else {
      TORCH_CHECK(call.states[slot].empty(), call.op, ": ", Rule::kStateNames[slot],
                  " must be empty without ", Rule::kStateNeeds[slot]);
    }
  }
  check_optimizer_tensors(call.op, call.params, companions, call.steps, device_type);
  if (call.params.empty() && device_type != c10::DeviceType::CPU) return;
  const at::Device device =
      call.params.empty() ? at::Device(c10::DeviceType::CPU) : call.params[0].device();
  check_scalar_tensor(call.op, "lr_tensor", call.lr_tensor, device, /*cpu_allowed=*/true,
                      /*float64_allowed=*/true);
  check_scalar_tensor(call.op, "grad_scale", call.grad_scale, device);
  check_scalar_tensor(call.op, "found_inf", call.found_inf, device);
}

}  // namespace fastopt
