// The update rule of fastopt::adadelta_step_ (torch.optim.Adadelta), for the CPU and CUDA
// drivers; see optim/step_call.h for what a rule provides. It follows torch's single-tensor
// reference operation by operation, so fp32 and fp64 match it to rounding.
#pragma once

#include "common/macros.h"
#include "optim/step_math.h"
#include "optim/step_op.h"

namespace fastopt {

struct AdadeltaOptions {
  double rho;
  double eps;
  double weight_decay;
  bool maximize;
};

template <typename C>
struct AdadeltaCoefficients {
  C grad_sign;  // -1 to maximize
  C weight_decay;
  C rho;
  C one_minus_rho;
  C eps;
  C neg_lr;
};

struct AdadeltaRule {
  static constexpr char kOpName[] = "fastopt::adadelta_step_";
  static constexpr int kStateSlots = 2;
  static constexpr const char* kStateNames[kStateSlots] = {"square_avgs", "acc_deltas"};
  static constexpr const char* kStateNeeds[kStateSlots] = {"", ""};
  static constexpr int kVariants = 1;
  FASTOPT_HOST_DEVICE static constexpr bool uses_state(int, int) { return true; }

  using Options = AdadeltaOptions;
  template <typename C>
  using Coefficients = AdadeltaCoefficients<C>;

  // The op's own arguments, in schema order.
  static StepConfig<Options> configure(double rho, double eps, double weight_decay, bool maximize) {
    return {{rho, eps, weight_decay, maximize}, 0};
  }

  template <typename C>
  FASTOPT_HOST_DEVICE static Coefficients<C> coefficients(const Options& o, double lr, double) {
    return {
        o.maximize ? C(-1) : C(1), C(o.weight_decay), C(o.rho), C(1.0 - o.rho), C(o.eps), C(-lr)};
  }

  // state: square_avg, acc_delta.
  template <int VARIANT, bool TORCH_ROUNDING, typename V, typename C>
  FASTOPT_HOST_DEVICE FASTOPT_INLINE static void update(V& param, V grad, V (&state)[kStateSlots],
                                                        const Coefficients<C>& k) {
    V& square_avg = state[0];
    V& acc_delta = state[1];
    grad = grad * k.grad_sign;
    // Skipped without decay, as in torch: 0 * inf would turn an infinite param into NaN.
    if (k.weight_decay != C(0)) grad = grad + k.weight_decay * param;
    square_avg = square_avg * k.rho + k.one_minus_rho * grad * grad;
    const V std = sqrt(square_avg + k.eps);
    const V delta = sqrt(acc_delta + k.eps) / std * grad;
    acc_delta = acc_delta * k.rho + k.one_minus_rho * delta * delta;
    param = param + k.neg_lr * delta;
  }
};

}  // namespace fastopt
