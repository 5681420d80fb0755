// The CUDA driver of every multi-tensor optimizer op: multi-tensor apply over (param, grad,
// state...) with 16-byte vector accesses. Step counts, a tensor lr, grad_scale and found_inf are
// read from device memory, so the whole step can be captured in a CUDA graph. Every rule of the
// op table is registered with it in optim/cuda/step_ops.cu.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>

#include <array>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "optim/cuda/multi_tensor_apply.cuh"
#include "optim/cuda/step_counts.cuh"
#include "optim/cuda/vector_access.cuh"
#include "optim/step_call.h"

namespace fastopt::cuda {

// The learning rate: from device memory when the caller gave a CUDA tensor, else a value.
struct LearningRate {
  const float* f32 = nullptr;
  const double* f64 = nullptr;
  double value = 0.0;

  __device__ double read() const { return f32 ? double(*f32) : (f64 ? *f64 : value); }
};

template <typename Rule>
struct DeviceStepArgs {
  typename Rule::Options options;
  LearningRate lr;
  const float* grad_scale;  // nullptr: grads are not scaled
  const float* found_inf;   // nullptr: no inf check
};

template <typename Rule, int VARIANT, bool UNSCALE, typename S>
struct StepFunctor {
  static constexpr int kSlots = Rule::kStateSlots;
  static constexpr int kDepth = 2 + kSlots;  // param, grad, state...

  __device__ __forceinline__ void operator()(const TensorListMetadata<kDepth>& meta,
                                             const DeviceStepArgs<Rule>& a) const {
    using C = at::opmath_type<S>;
    if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t start = int64_t(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const int64_t n = min(kChunkSize, meta.numels[tensor] - start);
    // The counters are advanced after this kernel: this step's count is the stored one plus 1,
    // added in float32 as torch (and the CPU kernel) add it.
    const double step = double(*meta.steps[tensor] + 1.0f);
    const auto k = Rule::template coefficients<C>(a.options, a.lr.read(), step);
    const C grad_scale = UNSCALE ? C(*a.grad_scale) : C(1);

    S* param = static_cast<S*>(meta.addresses[0][tensor]) + start;
    S* grad = static_cast<S*>(meta.addresses[1][tensor]) + start;
    S* state[kSlots];
    bool aligned = is_vector_aligned(param) && is_vector_aligned(grad);
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      state[s] = static_cast<S*>(meta.addresses[2 + s][tensor]) + start;
      if (Rule::uses_state(VARIANT, s)) aligned = aligned && is_vector_aligned(state[s]);
    }

    constexpr int kVec = kVectorBytes / sizeof(S);
    const int64_t vector_end = aligned ? n - n % kVec : 0;
    for (int64_t i = int64_t(threadIdx.x) * kVec; i < vector_end; i += int64_t(blockDim.x) * kVec) {
      C p[kVec], g[kVec], st[kSlots][kVec];
      load_vector(param + i, p);
      load_vector(grad + i, g);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) load_vector(state[s] + i, st[s]);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        C element_state[kSlots];
#pragma unroll
        for (int s = 0; s < kSlots; ++s) element_state[s] = st[s][j];
        update(p[j], g[j], element_state, k, grad_scale);
#pragma unroll
        for (int s = 0; s < kSlots; ++s) st[s][j] = element_state[s];
      }
      store_vector(param + i, p);
      if (UNSCALE) store_vector(grad + i, g);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) store_vector(state[s] + i, st[s]);
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < n; i += blockDim.x) {
      C p = C(param[i]), g = C(grad[i]), st[kSlots] = {};
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) st[s] = C(state[s][i]);
      }
      update(p, g, st, k, grad_scale);
      param[i] = S(p);
      if (UNSCALE) grad[i] = S(g);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) state[s][i] = S(st[s]);
      }
    }
  }

  template <typename C, typename K>
  __device__ __forceinline__ static void update(C& p, C& g, C (&st)[kSlots], const K& k,
                                                C grad_scale) {
    if (UNSCALE) g = g / grad_scale;
    Rule::template update<VARIANT>(p, g, st, k);
  }
};

// One multi-tensor pass over tensors of one dtype S, with the call's variant and scaling.
template <typename Rule, typename S, int VARIANT = 0>
void launch_step(const std::array<std::vector<at::Tensor>, 2 + Rule::kStateSlots>& lists,
                 const std::vector<at::Tensor>& steps, const DeviceStepArgs<Rule>& args,
                 int variant) {
  constexpr int kDepth = 2 + Rule::kStateSlots;
  if constexpr (VARIANT < Rule::kVariants) {
    if (variant != VARIANT) return launch_step<Rule, S, VARIANT + 1>(lists, steps, args, variant);
    if (args.grad_scale != nullptr) {
      multi_tensor_apply<kDepth>(lists, steps, StepFunctor<Rule, VARIANT, true, S>(), args);
    } else {
      multi_tensor_apply<kDepth>(lists, steps, StepFunctor<Rule, VARIANT, false, S>(), args);
    }
  }
}

// The device address of a checked float32 scalar tensor, or nullptr.
inline const float* float_pointer(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

inline LearningRate learning_rate(double lr, const std::optional<at::Tensor>& lr_tensor) {
  LearningRate result;
  if (!lr_tensor.has_value()) {
    result.value = lr;
  } else if (lr_tensor->is_cpu()) {
    result.value = lr_tensor->item<double>();
  } else if (lr_tensor->scalar_type() == at::kDouble) {
    result.f64 = lr_tensor->const_data_ptr<double>();
  } else {
    result.f32 = lr_tensor->const_data_ptr<float>();
  }
  return result;
}

template <typename Rule>
void run_step_on_cuda(const StepCall<Rule>& call) {
  constexpr int kDepth = 2 + Rule::kStateSlots;
  check_step_call(call, c10::DeviceType::CUDA);
  if (call.params.empty()) return;
  const c10::cuda::CUDAGuard guard(call.params[0].device());
  const DeviceStepArgs<Rule> args{call.options, learning_rate(call.lr, call.lr_tensor),
                                  float_pointer(call.grad_scale), float_pointer(call.found_inf)};

  // One multi-tensor pass per dtype present (a group may mix, e.g., fp32 and bf16 params).
  std::map<at::ScalarType,
           std::pair<std::array<std::vector<at::Tensor>, kDepth>, std::vector<at::Tensor>>>
      by_dtype;
  for (size_t i = 0; i < call.params.size(); ++i) {
    auto& [lists, dtype_steps] = by_dtype[call.params[i].scalar_type()];
    lists[0].push_back(call.params[i]);
    lists[1].push_back(call.grads[i]);
    for (int s = 0; s < Rule::kStateSlots; ++s) {
      // An unused slot is never dereferenced; the param keeps the lists the same length.
      lists[2 + s].push_back(Rule::uses_state(call.variant, s) ? call.states[s][i]
                                                               : call.params[i]);
    }
    dtype_steps.push_back(call.steps[i]);
  }
  for (const auto& entry : by_dtype) {
    const auto& lists = entry.second.first;         // not structured bindings: C++17 lambdas
    const auto& dtype_steps = entry.second.second;  // cannot capture those
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, entry.first, "fastopt_step_cuda",
        [&] { launch_step<Rule, scalar_t>(lists, dtype_steps, args, call.variant); });
  }
  increment_steps(std::vector<at::Tensor>(call.steps.begin(), call.steps.end()), args.found_inf);
}

}  // namespace fastopt::cuda
