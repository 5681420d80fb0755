// fastopt::adam_step_ on the CPU: every tensor of the call in one parallel region, one pass over
// memory, the per-element loop compiled per instruction set.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/adam_checks.h"
#include "common/adam_math.h"
#include "cpu/dtype_switch.h"
#include "cpu/isa.h"
#include "cpu/multi_tensor.h"
#include "cpu/prefetched_loop.h"

namespace fastopt::cpu {
namespace {

// Where one param and its state live, gathered before the parallel region: the threads then
// read one compact array instead of each tensor's metadata, which is cold after backward().
struct AdamTensor {
  c10::ScalarType dtype;
  void* param;
  void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  AdamCoefficients<float> coefficients_float;
  AdamCoefficients<double> coefficients_double;
};

// One contiguous element range of one param and its state.
struct AdamPiece {
  const AdamTensor* tensor;
  bool amsgrad;
  bool unscale;  // divide grads by grad_scale and store them back unscaled, as torch's fused does
  double grad_scale;
  int64_t begin;
  int64_t end;
};

template <typename C>
FASTOPT_INLINE const AdamCoefficients<C>& coefficients_of(const AdamTensor& t);
template <>
FASTOPT_INLINE const AdamCoefficients<float>& coefficients_of<float>(const AdamTensor& t) {
  return t.coefficients_float;
}
template <>
FASTOPT_INLINE const AdamCoefficients<double>& coefficients_of<double>(const AdamTensor& t) {
  return t.coefficients_double;
}

template <bool AMSGRAD, bool UNSCALE>
struct AdamLoop {
  template <typename S>
  FASTOPT_INLINE static void run(const AdamPiece& a) {
    using C = at::opmath_type<S>;
    const AdamTensor& t = *a.tensor;
    const AdamCoefficients<C> k = coefficients_of<C>(t);
    const C grad_scale = C(a.grad_scale);
    S* __restrict__ param = static_cast<S*>(t.param);
    S* __restrict__ grad = static_cast<S*>(t.grad);
    S* __restrict__ exp_avg = static_cast<S*>(t.exp_avg);
    S* __restrict__ exp_avg_sq = static_cast<S*>(t.exp_avg_sq);
    S* __restrict__ max_exp_avg_sq = static_cast<S*>(t.max_exp_avg_sq);
    const auto element = [&](int64_t i) FASTOPT_INLINE_LAMBDA {
      C p = C(param[i]);
      C g = C(grad[i]);
      C m = C(exp_avg[i]);
      C v = C(exp_avg_sq[i]);
      C v_max = AMSGRAD ? C(max_exp_avg_sq[i]) : C(0);
      if (UNSCALE) {
        g = g / grad_scale;
        grad[i] = S(g);
      }
      adam_update<AMSGRAD>(p, g, m, v, v_max, k);
      param[i] = S(p);
      exp_avg[i] = S(m);
      exp_avg_sq[i] = S(v);
      if (AMSGRAD) max_exp_avg_sq[i] = S(v_max);
    };
    prefetched_loop(a.begin, a.end, element, param, grad, exp_avg, exp_avg_sq);
  }
};

FASTOPT_INLINE void adam_piece_body(const AdamPiece& a) {
  if (a.amsgrad) {
    a.unscale ? switch_param_dtype<AdamLoop<true, true>>(a.tensor->dtype, a)
              : switch_param_dtype<AdamLoop<true, false>>(a.tensor->dtype, a);
  } else {
    a.unscale ? switch_param_dtype<AdamLoop<false, true>>(a.tensor->dtype, a)
              : switch_param_dtype<AdamLoop<false, false>>(a.tensor->dtype, a);
  }
}

FASTOPT_DISPATCH_BY_ISA(adam_piece, adam_piece_body, AdamPiece)

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, at::TensorList steps,
                   double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                   double beta2, double eps, double weight_decay, bool decoupled_weight_decay,
                   bool amsgrad, bool maximize, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf) {
  check_adam_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad,
                     c10::DeviceType::CPU);
  const at::Device cpu(c10::DeviceType::CPU);
  check_scalar_tensor(kAdamStepName, "lr_tensor", lr_tensor, cpu, /*cpu_allowed=*/true,
                      /*float64_allowed=*/true);
  check_scalar_tensor(kAdamStepName, "grad_scale", grad_scale, cpu);
  check_scalar_tensor(kAdamStepName, "found_inf", found_inf, cpu);
  // An inf/NaN gradient was found: the step is skipped entirely, step counts included.
  if (found_inf.has_value() && found_inf->item<double>() != 0) return;
  if (lr_tensor.has_value()) lr = lr_tensor->item<double>();

  const AdamOptions options{beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize};
  const size_t n = params.size();
  std::vector<int64_t> numels(n);
  std::vector<float> new_steps(n);
  std::vector<AdamTensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    AdamTensor& t = tensors[i];
    numels[i] = params[i].numel();
    new_steps[i] = *steps[i].const_data_ptr<float>() + 1.0f;
    t.dtype = params[i].scalar_type();
    t.param = params[i].data_ptr();
    t.grad = grads[i].data_ptr();
    t.exp_avg = exp_avgs[i].data_ptr();
    t.exp_avg_sq = exp_avg_sqs[i].data_ptr();
    t.max_exp_avg_sq = amsgrad ? max_exp_avg_sqs[i].data_ptr() : nullptr;
    if (i > 0 && new_steps[i] == new_steps[i - 1]) {  // the usual case: one count for all
      t.coefficients_float = tensors[i - 1].coefficients_float;
      t.coefficients_double = tensors[i - 1].coefficients_double;
    } else {
      t.coefficients_float = adam_coefficients<float>(options, lr, new_steps[i]);
      t.coefficients_double = adam_coefficients<double>(options, lr, new_steps[i]);
    }
  }

  const double scale = grad_scale.has_value() ? grad_scale->item<double>() : 1.0;
  for_each_piece_in_parallel(numels, [&](size_t t, int64_t begin, int64_t end) {
    adam_piece(AdamPiece{&tensors[t], amsgrad, grad_scale.has_value(), scale, begin, end});
  });
  for (size_t i = 0; i < n; ++i) *steps[i].mutable_data_ptr<float>() = new_steps[i];
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CPU, m) {
  m.impl("adam_step_", &adam_step_cpu);
}

}  // namespace fastopt::cpu
