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

inline constexpr char kRmspropStepName[] = "fastopt::rmsprop_step_";
using RmspropStepSignature = void(at::TensorList params, at::TensorList grads,
                                  at::TensorList square_avgs, at::TensorList momentum_buffers,
                                  at::TensorList grad_avgs, at::TensorList steps, double lr,
                                  const std::optional<at::Tensor>& lr_tensor, double alpha,
                                  double eps, double weight_decay, double momentum, bool centered,
                                  bool maximize, const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& found_inf);

inline constexpr char kAdagradStepName[] = "fastopt::adagrad_step_";
using AdagradStepSignature = void(at::TensorList params, at::TensorList grads,
                                  at::TensorList state_sums, at::TensorList steps, double lr,
                                  const std::optional<at::Tensor>& lr_tensor, double lr_decay,
                                  double weight_decay, double eps, bool maximize,
                                  const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& found_inf);

inline constexpr char kAdadeltaStepName[] = "fastopt::adadelta_step_";
using AdadeltaStepSignature = void(at::TensorList params, at::TensorList grads,
                                   at::TensorList square_avgs, at::TensorList acc_deltas,
                                   at::TensorList steps, double lr,
                                   const std::optional<at::Tensor>& lr_tensor, double rho,
                                   double eps, double weight_decay, bool maximize,
                                   const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf);

inline constexpr char kSparseAdagradStepName[] = "fastopt::sparse_adagrad_step_";
using SparseAdagradStepSignature = void(const at::Tensor& param, const at::Tensor& grad,
                                        const at::Tensor& state_sum, const at::Tensor& step,
                                        double lr, const std::optional<at::Tensor>& lr_tensor,
                                        double lr_decay, double eps, bool maximize,
                                        const std::optional<at::Tensor>& grad_scale,
                                        const std::optional<at::Tensor>& found_inf);

}  // namespace fastopt
