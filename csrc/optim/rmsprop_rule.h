// The update rule of fastopt::rmsprop_step_ (torch.optim.RMSprop), for the CPU and CUDA drivers;
// see optim/step_call.h for what a rule provides. It follows torch's single-tensor reference
// operation by operation, so fp32 and fp64 match it to rounding.
#pragma once

#include "common/macros.h"
#include "optim/step_math.h"
#include "optim/step_op.h"

namespace fastopt {

struct RmspropOptions {
  double alpha;
  double eps;
  double weight_decay;
  double momentum;
  bool maximize;
};

template <typename C>
struct RmspropCoefficients {
  C grad_sign;  // -1 to maximize
  C weight_decay;
  C alpha;
  C one_minus_alpha;
  C eps;
  C momentum;
  C neg_lr;
};

struct RmspropRule {
  static constexpr char kOpName[] = "fastopt::rmsprop_step_";
  static constexpr int kStateSlots = 3;
  static constexpr const char* kStateNames[kStateSlots] = {"square_avgs", "momentum_buffers",
                                                           "grad_avgs"};
  static constexpr const char* kStateNeeds[kStateSlots] = {"", "momentum > 0", "centered=True"};
  static constexpr int kMomentum = 1;
  static constexpr int kCentered = 2;
  static constexpr int kVariants = 4;
  FASTOPT_HOST_DEVICE static constexpr bool uses_state(int variant, int slot) {
    return slot == 0 || (slot == 1 && (variant & kMomentum) != 0) ||
           (slot == 2 && (variant & kCentered) != 0);
  }

  using Options = RmspropOptions;
  template <typename C>
  using Coefficients = RmspropCoefficients<C>;

  // The op's own arguments, in schema order.
  static StepConfig<Options> configure(double alpha, double eps, double weight_decay,
                                       double momentum, bool centered, bool maximize) {
    return {{alpha, eps, weight_decay, momentum, maximize},
            (momentum > 0 ? kMomentum : 0) | (centered ? kCentered : 0)};
  }

  template <typename C>
  FASTOPT_HOST_DEVICE static Coefficients<C> coefficients(const Options& o, double lr, double) {
    return {o.maximize ? C(-1) : C(1),
            C(o.weight_decay),
            C(o.alpha),
            C(1.0 - o.alpha),
            C(o.eps),
            C(o.momentum),
            C(-lr)};
  }

  // state: square_avg, momentum_buffer, grad_avg.
  template <int VARIANT, bool TORCH_ROUNDING, typename V, typename C>
  FASTOPT_HOST_DEVICE FASTOPT_INLINE static void update(V& param, V grad, V (&state)[kStateSlots],
                                                        const Coefficients<C>& k) {
    V& square_avg = state[0];
    grad = grad * k.grad_sign;
    // Skipped without decay, as in torch: 0 * inf would turn an infinite param into NaN.
    if (k.weight_decay != C(0)) grad = grad + k.weight_decay * param;
    square_avg = square_avg * k.alpha + k.one_minus_alpha * grad * grad;
    V avg;
    if constexpr ((VARIANT & kCentered) != 0) {
      V& grad_avg = state[2];
      grad_avg = lerp(grad_avg, grad, k.one_minus_alpha);
      avg = sqrt(square_avg + C(-1) * grad_avg * grad_avg);
    } else {
      avg = sqrt(square_avg);
    }
    avg = avg + k.eps;
    if constexpr ((VARIANT & kMomentum) != 0) {
      V& buffer = state[1];
      buffer = buffer * k.momentum + grad / avg;
      param = param + k.neg_lr * buffer;
    } else {
      param = param + k.neg_lr * grad / avg;
    }
  }
};

}  // namespace fastopt
