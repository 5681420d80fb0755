// The C++ side of every multi-tensor optimizer op, derived from its update rule: the op's
// signature and its kernel for a device's driver. No optimizer writes these by hand.
//
// Every such op's arguments are a shared head and tail around the rule's own (its schema is
// built the same way in fastopt/_step_ops.py):
//   params, grads, <one list per state slot>, steps, lr, lr_tensor,
//   <the parameters of Rule::configure>, grad_scale, found_inf, masters, grad_norm,
//   max_grad_norm, rounding_seeds
// An argument every optimizer takes is added here (and to StepCall), once.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>

#include <cstddef>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "optim/step_call.h"

namespace fastopt {

// What Rule::configure derives from the op's own arguments.
template <typename Options>
struct StepConfig {
  Options options;
  int variant;  // which state slots the kernels read and write (Rule::uses_state)
};

// "fastopt::adam_step_" -> "fastopt.adam_step_", the name users call the op by.
inline std::string op_display_name(const char* qualified_name) {
  std::string name(qualified_name);
  const size_t separator = name.find("::");
  if (separator != std::string::npos) name.replace(separator, 2, ".");
  return name;
}

template <size_t>
using StateList = at::TensorList;

// The C++ type of the schema's `Tensor(x!)?[] masters`.
using OptionalTensorList = c10::List<std::optional<at::Tensor>>;

template <typename Rule, typename Slots = std::make_index_sequence<Rule::kStateSlots>,
          typename Configure = decltype(&Rule::configure)>
struct StepOp;

template <typename Rule, size_t... Slot, typename... Own>
struct StepOp<Rule, std::index_sequence<Slot...>, StepConfig<typename Rule::Options> (*)(Own...)> {
  using Signature = void(at::TensorList params, at::TensorList grads, StateList<Slot>... states,
                         at::TensorList steps, double lr,
                         const std::optional<at::Tensor>& lr_tensor, Own... own,
                         const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf,
                         const OptionalTensorList& masters,
                         const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                         at::IntArrayRef rounding_seeds);

  // The op's kernel on the device whose driver is `Run`.
  template <void (*Run)(const StepCall<Rule>&)>
  static void kernel(at::TensorList params, at::TensorList grads, StateList<Slot>... states,
                     at::TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                     Own... own, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const OptionalTensorList& masters,
                     const std::optional<at::Tensor>& grad_norm, double max_grad_norm,
                     at::IntArrayRef rounding_seeds) {
    static const std::string name = op_display_name(Rule::kOpName);
    const StepConfig<typename Rule::Options> config = Rule::configure(own...);
    std::vector<std::optional<at::Tensor>> master_list(masters.begin(), masters.end());
    Run(StepCall<Rule>{name.c_str(),
                       params,
                       grads,
                       {states...},
                       steps,
                       config.variant,
                       config.options,
                       lr,
                       lr_tensor,
                       grad_scale,
                       found_inf,
                       std::move(master_list),
                       grad_norm,
                       max_grad_norm,
                       rounding_seeds});
  }
};

}  // namespace fastopt
