// The update rule of fastopt::adagrad_step_ (torch.optim.Adagrad, dense grads), for the CPU and
// CUDA drivers; see optim/step_call.h for what a rule provides. It follows torch's
// single-tensor reference operation by operation, so fp32 and fp64 match it to rounding. The
// sparse row update is optim/sparse_adagrad.h.
#pragma once

#include "common/macros.h"
#include "optim/step_math.h"
#include "optim/step_op.h"

namespace fastopt {

struct AdagradOptions {
  double lr_decay;
  double weight_decay;
  double eps;
  bool maximize;
};

template <typename C>
struct AdagradCoefficients {
  C grad_sign;  // -1 to maximize
  C weight_decay;
  C neg_clr;  // -lr / (1 + (step - 1) * lr_decay)
  C eps;
};

// The decayed learning rate of step `step`, as torch computes it (in double).
FASTOPT_HOST_DEVICE inline double adagrad_clr(double lr, double lr_decay, double step) {
  return lr / (1 + (step - 1) * lr_decay);
}

struct AdagradRule {
  static constexpr char kOpName[] = "fastopt::adagrad_step_";
  static constexpr int kStateSlots = 1;
  static constexpr const char* kStateNames[kStateSlots] = {"state_sums"};
  static constexpr const char* kStateNeeds[kStateSlots] = {""};
  static constexpr int kVariants = 1;
  FASTOPT_HOST_DEVICE static constexpr bool uses_state(int, int) { return true; }

  using Options = AdagradOptions;
  template <typename C>
  using Coefficients = AdagradCoefficients<C>;

  // The op's own arguments, in schema order.
  static StepConfig<Options> configure(double lr_decay, double weight_decay, double eps,
                                       bool maximize) {
    return {{lr_decay, weight_decay, eps, maximize}, 0};
  }

  template <typename C>
  FASTOPT_HOST_DEVICE static Coefficients<C> coefficients(const Options& o, double lr,
                                                          double step) {
    return {o.maximize ? C(-1) : C(1), C(o.weight_decay), C(-adagrad_clr(lr, o.lr_decay, step)),
            C(o.eps)};
  }

  // state: sum.
  template <int VARIANT, bool TORCH_ROUNDING, typename V, typename C>
  FASTOPT_HOST_DEVICE FASTOPT_INLINE static void update(V& param, V grad, V (&state)[kStateSlots],
                                                        const Coefficients<C>& k) {
    V& sum = state[0];
    grad = grad * k.grad_sign;
    // Skipped without decay, as in torch: 0 * inf would turn an infinite param into NaN.
    if (k.weight_decay != C(0)) grad = grad + k.weight_decay * param;
    sum = sum + grad * grad;
    const V std = sqrt(sum) + k.eps;
    param = param + k.neg_clr * grad / std;
  }
};

}  // namespace fastopt
