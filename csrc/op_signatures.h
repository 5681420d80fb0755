// C++ signatures of fastopt's ops, as defined by their schemas in fastopt/_library.py, for code
// that calls them through the dispatcher.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastopt {

inline constexpr char kAdamStepName[] = "fastopt::adam_step_";
using AdamStepSignature = void(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                               at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                               at::TensorList steps, double lr,
                               const std::optional<at::Tensor>& lr_tensor, double beta1,
                               double beta2, double eps, double weight_decay,
                               bool decoupled_weight_decay, bool amsgrad, bool maximize,
                               const std::optional<at::Tensor>& grad_scale,
                               const std::optional<at::Tensor>& found_inf);

}  // namespace fastopt
