// The update rule of fastopt::adam_step_ (Adam and AdamW), for the CPU and CUDA drivers; see
// optim/step_call.h for what a rule provides.
//
// It follows torch.optim.Adam's single-tensor reference (foreach=False) operation by operation,
// so fp32 and fp64 results match it to rounding. Low-precision params (bf16, fp16) are loaded,
// updated in the compute type C (float) and rounded once on store, which is more accurate than
// the reference's rounding after every operation.
#pragma once

#include <cmath>

#include "common/macros.h"
#include "optim/step_math.h"
#include "optim/step_op.h"

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
  C inverse_bias_correction2_sqrt;
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
  const double bias_correction2_sqrt = sqrt(1.0 - pow(o.beta2, step));
  k.bias_correction2_sqrt = C(bias_correction2_sqrt);
  k.inverse_bias_correction2_sqrt = C(1.0 / bias_correction2_sqrt);
  k.eps = C(o.eps);
  return k;
}

struct AdamRule {
  static constexpr char kOpName[] = "fastopt::adam_step_";
  static constexpr int kStateSlots = 3;
  static constexpr const char* kStateNames[kStateSlots] = {"exp_avgs", "exp_avg_sqs",
                                                           "max_exp_avg_sqs"};
  static constexpr const char* kStateNeeds[kStateSlots] = {"", "", "amsgrad=True"};
  static constexpr int kAmsgrad = 1;  // max_exp_avg_sq is read and written only with it
  static constexpr int kVariants = 2;
  FASTOPT_HOST_DEVICE static constexpr bool uses_state(int variant, int slot) {
    return slot < 2 || (variant & kAmsgrad) != 0;
  }

  using Options = AdamOptions;
  template <typename C>
  using Coefficients = AdamCoefficients<C>;

  // The op's own arguments, in schema order.
  static StepConfig<Options> configure(double beta1, double beta2, double eps, double weight_decay,
                                       bool decoupled_weight_decay, bool amsgrad, bool maximize) {
    return {{beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize},
            amsgrad ? kAmsgrad : 0};
  }

  template <typename C>
  FASTOPT_HOST_DEVICE static Coefficients<C> coefficients(const Options& o, double lr,
                                                          double step) {
    return adam_coefficients<C>(o, lr, step);
  }

  // state: exp_avg, exp_avg_sq, max_exp_avg_sq.
  template <int VARIANT, bool TORCH_ROUNDING, typename V, typename C>
  FASTOPT_HOST_DEVICE FASTOPT_INLINE static void update(V& param, V grad, V (&state)[kStateSlots],
                                                        const Coefficients<C>& k) {
    V& exp_avg = state[0];
    V& exp_avg_sq = state[1];
    grad = grad * k.grad_sign;
    param = param * k.param_decay;
    // Skipped without an L2 term, as in torch: 0 * inf would turn an infinite param into NaN.
    if (k.grad_decay != C(0)) grad = grad + k.grad_decay * param;
    exp_avg = lerp(exp_avg, grad, k.exp_avg_weight);
    exp_avg_sq = exp_avg_sq * k.beta2 + k.one_minus_beta2 * grad * grad;
    V second_moment = exp_avg_sq;
    if constexpr ((VARIANT & kAmsgrad) != 0) {
      state[2] = nan_propagating_max(state[2], exp_avg_sq);
      second_moment = state[2];
    }
    // Division is the slowest arithmetic of the step (it and sqrt share one unit, on CPUs and
    // GPUs alike): where the stored values are rounded to 16 bits, dividing by the constant
    // bias_correction2_sqrt becomes a multiplication by its reciprocal (two roundings instead of
    // one: within about an ulp of float32 of torch's correctly rounded quotient).
    const V scaled_sqrt = TORCH_ROUNDING ? sqrt(second_moment) / k.bias_correction2_sqrt
                                         : sqrt(second_moment) * k.inverse_bias_correction2_sqrt;
    const V denom = scaled_sqrt + k.eps;
    param = param + (-k.step_size) * (exp_avg / denom);
  }
};

}  // namespace fastopt
