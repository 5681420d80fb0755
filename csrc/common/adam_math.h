// The math of one Adam / AdamW step, written once for the CPU and CUDA kernels.
//
// It follows torch.optim.Adam's single-tensor reference (foreach=False) operation by operation,
// so fp32 and fp64 results match it to rounding. Low-precision params (bf16, fp16) are loaded,
// updated in the compute type C (float) and rounded once on store, which is more accurate than
// the reference's rounding after every operation.
#pragma once

#include <cmath>

#include "common/macros.h"
#include "common/step_math.h"

namespace fastopt {

// Hyperparameters shared by every tensor of one call.
struct AdamOptions {
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
  bool decoupled_weight_decay;  // AdamW
  bool maximize;
};

// What one tensor's update needs beyond the elements: derived from the options and that tensor's
// step count once per step, in double as the reference does in Python.
template <typename C>
struct AdamCoefficients {
  C grad_sign;       // -1 to maximize
  C grad_decay;      // weight_decay for Adam's L2 term, else 0
  C param_decay;     // 1 - lr * weight_decay for AdamW, else 1
  C exp_avg_weight;  // 1 - beta1, the lerp weight of exp_avg toward grad
  C beta2;
  C one_minus_beta2;
  C step_size;  // lr / (1 - beta1^step)
  C bias_correction2_sqrt;
  C eps;
};

template <typename C>
FASTOPT_HOST_DEVICE inline AdamCoefficients<C> adam_coefficients(const AdamOptions& o, double lr,
                                                                 double step) {
  const bool decoupled = o.decoupled_weight_decay;
  AdamCoefficients<C> k;
  k.grad_sign = o.maximize ? C(-1) : C(1);
  k.grad_decay = decoupled ? C(0) : C(o.weight_decay);
  k.param_decay = decoupled ? C(1.0 - lr * o.weight_decay) : C(1);
  k.exp_avg_weight = C(1.0 - o.beta1);
  k.beta2 = C(o.beta2);
  k.one_minus_beta2 = C(1.0 - o.beta2);
  k.step_size = C(lr / (1.0 - pow(o.beta1, step)));
  k.bias_correction2_sqrt = C(sqrt(1.0 - pow(o.beta2, step)));
  k.eps = C(o.eps);
  return k;
}

// One element. `grad` arrives already unscaled. AMSGRAD is a template parameter because it
// changes the memory traffic (max_exp_avg_sq is read and written only with it).
template <bool AMSGRAD, typename C>
FASTOPT_HOST_DEVICE FASTOPT_INLINE void adam_update(C& param, C grad, C& exp_avg, C& exp_avg_sq,
                                                    C& max_exp_avg_sq,
                                                    const AdamCoefficients<C>& k) {
  grad = grad * k.grad_sign;
  param = param * k.param_decay;
  // Skipped without an L2 term, as in torch: 0 * inf would turn an infinite param into NaN.
  if (k.grad_decay != C(0)) grad = grad + k.grad_decay * param;
  exp_avg = lerp(exp_avg, grad, k.exp_avg_weight);
  exp_avg_sq = exp_avg_sq * k.beta2 + k.one_minus_beta2 * grad * grad;
  C second_moment = exp_avg_sq;
  if (AMSGRAD) {
    max_exp_avg_sq = nan_propagating_max(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const C denom = sqrt(second_moment) / k.bias_correction2_sqrt + k.eps;
  param = param + (-k.step_size) * (exp_avg / denom);
}

}  // namespace fastopt
