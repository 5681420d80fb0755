// fastopt::adam_step_ on CUDA: multi-tensor apply over (param, grad, exp_avg, exp_avg_sq,
// max_exp_avg_sq) with 16-byte vector accesses. Step counts, a tensor lr, grad_scale and
// found_inf are read from device memory, so the whole step can be captured in a CUDA graph.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <map>
#include <optional>
#include <vector>

#include "common/adam_checks.h"
#include "common/adam_math.h"
#include "cuda/multi_tensor_apply.cuh"
#include "cuda/step_counts.cuh"
#include "cuda/vector_access.cuh"

namespace fastopt::cuda {
namespace {

constexpr int kDepth = 5;  // param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq

// The learning rate: from device memory when the caller gave a CUDA tensor, else a value.
struct LearningRate {
  const float* f32 = nullptr;
  const double* f64 = nullptr;
  double value = 0.0;

  __device__ double read() const { return f32 ? double(*f32) : (f64 ? *f64 : value); }
};

struct AdamArgs {
  AdamOptions options;
  LearningRate lr;
  const float* grad_scale;  // nullptr: grads are not scaled
  const float* found_inf;   // nullptr: no inf check
};

template <typename S, bool AMSGRAD, bool UNSCALE>
struct AdamFunctor {
  __device__ __forceinline__ void operator()(const TensorListMetadata<kDepth>& meta,
                                             const AdamArgs& a) const {
    using C = at::opmath_type<S>;
    if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t start = int64_t(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numels[tensor] - start);
    // The counters are advanced after this kernel: this step's count is the stored one plus 1,
    // added in float32 as torch (and the CPU kernel) add it.
    const double step = double(*meta.steps[tensor] + 1.0f);
    const AdamCoefficients<C> k = adam_coefficients<C>(a.options, a.lr.read(), step);
    const C grad_scale = UNSCALE ? C(*a.grad_scale) : C(1);

    S* param = static_cast<S*>(meta.addresses[0][tensor]) + start;
    S* grad = static_cast<S*>(meta.addresses[1][tensor]) + start;
    S* exp_avg = static_cast<S*>(meta.addresses[2][tensor]) + start;
    S* exp_avg_sq = static_cast<S*>(meta.addresses[3][tensor]) + start;
    S* max_exp_avg_sq = static_cast<S*>(meta.addresses[4][tensor]) + start;

    auto update = [&](C& p, C& g, C& m, C& v, C& v_max) {
      if (UNSCALE) g = g / grad_scale;
      adam_update<AMSGRAD>(p, g, m, v, v_max, k);
    };

    constexpr int kVec = kVectorBytes / sizeof(S);
    const bool aligned = is_vector_aligned(param) && is_vector_aligned(grad) &&
                         is_vector_aligned(exp_avg) && is_vector_aligned(exp_avg_sq) &&
                         (!AMSGRAD || is_vector_aligned(max_exp_avg_sq));
    const int64_t vector_end = aligned ? n - n % kVec : 0;
    for (int64_t i = int64_t(threadIdx.x) * kVec; i < vector_end; i += int64_t(blockDim.x) * kVec) {
      C p[kVec], g[kVec], m[kVec], v[kVec], v_max[kVec];
      load_vector(param + i, p);
      load_vector(grad + i, g);
      load_vector(exp_avg + i, m);
      load_vector(exp_avg_sq + i, v);
      if (AMSGRAD) load_vector(max_exp_avg_sq + i, v_max);
#pragma unroll
      for (int j = 0; j < kVec; ++j) update(p[j], g[j], m[j], v[j], v_max[j]);
      store_vector(param + i, p);
      if (UNSCALE) store_vector(grad + i, g);
      store_vector(exp_avg + i, m);
      store_vector(exp_avg_sq + i, v);
      if (AMSGRAD) store_vector(max_exp_avg_sq + i, v_max);
    }
    for (int64_t i = vector_end + threadIdx.x; i < n; i += blockDim.x) {
      C p = C(param[i]), g = C(grad[i]), m = C(exp_avg[i]), v = C(exp_avg_sq[i]);
      C v_max = AMSGRAD ? C(max_exp_avg_sq[i]) : C(0);
      update(p, g, m, v, v_max);
      param[i] = S(p);
      if (UNSCALE) grad[i] = S(g);
      exp_avg[i] = S(m);
      exp_avg_sq[i] = S(v);
      if (AMSGRAD) max_exp_avg_sq[i] = S(v_max);
    }
  }
};

template <typename S>
void launch_adam(const std::array<std::vector<at::Tensor>, kDepth>& lists,
                 const std::vector<at::Tensor>& steps, const AdamArgs& args, bool amsgrad) {
  const bool unscale = args.grad_scale != nullptr;
  if (amsgrad) {
    unscale ? multi_tensor_apply<kDepth>(lists, steps, AdamFunctor<S, true, true>(), args)
            : multi_tensor_apply<kDepth>(lists, steps, AdamFunctor<S, true, false>(), args);
  } else {
    unscale ? multi_tensor_apply<kDepth>(lists, steps, AdamFunctor<S, false, true>(), args)
            : multi_tensor_apply<kDepth>(lists, steps, AdamFunctor<S, false, false>(), args);
  }
}

// The device address of a checked float32 scalar tensor, or nullptr.
const float* float_pointer(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                    at::TensorList steps, double lr, const std::optional<at::Tensor>& lr_tensor,
                    double beta1, double beta2, double eps, double weight_decay,
                    bool decoupled_weight_decay, bool amsgrad, bool maximize,
                    const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf) {
  check_adam_tensors(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad,
                     c10::DeviceType::CUDA);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  check_scalar_tensor(kAdamStepName, "lr_tensor", lr_tensor, device, /*cpu_allowed=*/true,
                      /*float64_allowed=*/true);
  check_scalar_tensor(kAdamStepName, "grad_scale", grad_scale, device);
  check_scalar_tensor(kAdamStepName, "found_inf", found_inf, device);
  const c10::cuda::CUDAGuard guard(device);

  AdamArgs args{{beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize},
                LearningRate{},
                float_pointer(grad_scale),
                float_pointer(found_inf)};
  if (!lr_tensor.has_value()) {
    args.lr.value = lr;
  } else if (lr_tensor->is_cpu()) {
    args.lr.value = lr_tensor->item<double>();
  } else if (lr_tensor->scalar_type() == at::kDouble) {
    args.lr.f64 = lr_tensor->const_data_ptr<double>();
  } else {
    args.lr.f32 = lr_tensor->const_data_ptr<float>();
  }

  // One multi-tensor pass per dtype present (a group may mix, e.g., fp32 and bf16 params).
  std::map<at::ScalarType,
           std::pair<std::array<std::vector<at::Tensor>, kDepth>, std::vector<at::Tensor>>>
      by_dtype;
  for (size_t i = 0; i < params.size(); ++i) {
    auto& [lists, dtype_steps] = by_dtype[params[i].scalar_type()];
    lists[0].push_back(params[i]);
    lists[1].push_back(grads[i]);
    lists[2].push_back(exp_avgs[i]);
    lists[3].push_back(exp_avg_sqs[i]);
    // Never dereferenced without amsgrad; the param keeps the five lists the same length.
    lists[4].push_back(amsgrad ? max_exp_avg_sqs[i] : params[i]);
    dtype_steps.push_back(steps[i]);
  }
  for (const auto& entry : by_dtype) {
    const auto& lists = entry.second.first;         // not structured bindings: C++17 lambdas
    const auto& dtype_steps = entry.second.second;  // cannot capture those
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, entry.first, "fastopt_adam_step_cuda",
        [&] { launch_adam<scalar_t>(lists, dtype_steps, args, amsgrad); });
  }
  increment_steps(std::vector<at::Tensor>(steps.begin(), steps.end()), args.found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastopt, CUDA, m) {
  m.impl("adam_step_", &adam_step_cuda);
}

}  // namespace fastopt::cuda
