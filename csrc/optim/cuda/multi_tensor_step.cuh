// The CUDA driver of every multi-tensor optimizer op: multi-tensor apply over (param, grad,
// master, state...) with 16-byte vector accesses, one launch for params of every dtype, master
// copy and state dtype (optim/step_storage.h). Step counts, a tensor lr, grad_scale, found_inf and
// the grad norm are read from device memory, so the whole step can be captured in a CUDA graph.
// Every rule of the op table is registered with it in optim/cuda/step_ops.cu, its kernels
// compiled in optim/cuda/step_kernels_*.cu.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <utility>
#include <vector>

#include "optim/cuda/launch.cuh"
#include "optim/cuda/multi_tensor_apply.cuh"
#include "optim/cuda/step_counts.cuh"
#include "optim/cuda/vector_access.cuh"
#include "optim/step_call.h"

namespace fastopt::cuda {

// The learning rate: read by the kernel when the caller gave a tensor on the params' device (so a
// captured graph sees its updates), else a value.
struct LearningRate {
  const float* f32 = nullptr;
  const double* f64 = nullptr;
  double value = 0.0;

  __device__ double read() const { return f32 ? double(*f32) : (f64 ? *f64 : value); }
};

// A float32 or float64 one-element tensor in device memory, or none.
struct DeviceScalar {
  const float* f32 = nullptr;
  const double* f64 = nullptr;
};

template <typename Rule>
struct DeviceStepArgs {
  typename Rule::Options options;
  LearningRate lr;
  const float* grad_scale;  // nullptr: grads are not scaled
  const float* found_inf;   // nullptr: no inf check
  DeviceScalar grad_norm;   // none: no clipping
  double max_grad_norm;
};

// What a tensor's tag (TensorListMetadata::tags) holds: its storage layout and rounding seed.
__host__ __device__ inline uint64_t step_tag(StorageLayout layout, uint32_t seed) {
  return uint64_t(seed) << 32 | uint64_t(layout);
}

template <typename Rule, int VARIANT, bool UNSCALE>
struct StepFunctor {
  static constexpr int kSlots = Rule::kStateSlots;
  static constexpr int kDepth = 3 + kSlots;  // param, grad, master, state...

  struct Chunk {
    const TensorListMetadata<kDepth>& meta;
    const DeviceStepArgs<Rule>& args;
    int tensor;
    int64_t start;  // the chunk's first element in its tensor
    int64_t n;      // its elements
  };

  __device__ __forceinline__ void operator()(const TensorListMetadata<kDepth>& meta,
                                             const DeviceStepArgs<Rule>& a) const {
    if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;
    const int tensor = meta.block_to_tensor[blockIdx.x];
    const int64_t start = int64_t(meta.block_to_chunk[blockIdx.x]) * kChunkSize;
    const Chunk chunk{meta, a, tensor, start, min(kChunkSize, meta.numels[tensor] - start)};
    // One launch takes params of every storage layout; a block's chunk has one.
    switch_storage<StepFunctor>(StorageLayout(meta.tags[tensor] & 0xff), chunk);
  }

  template <typename St>
  __device__ __forceinline__ static void run(const Chunk& c) {
    using S = typename St::Param;
    using T = typename St::State;
    using C = typename St::Compute;
    using M = MasterElement<St>;
    constexpr bool kMaster = St::kMaster != MasterKind::kNone;
    const DeviceStepArgs<Rule>& a = c.args;
    // The counters are advanced after this kernel: this step's count is the stored one plus 1,
    // added in float32 as torch (and the CPU kernel) add it.
    const float step = *c.meta.steps[c.tensor] + 1.0f;
    const auto k = Rule::template coefficients<C>(a.options, a.lr.read(), double(step));
    const C grad_scale = UNSCALE ? C(*a.grad_scale) : C(1);
    const C clip = C(clip_coefficient_on_device(a.grad_norm, a.max_grad_norm));
    const uint32_t seed = uint32_t(c.meta.tags[c.tensor] >> 32);
    uint32_t keys[rounding_streams(kSlots)];
#pragma unroll
    for (int k = 0; k < rounding_streams(kSlots); ++k)
      keys[k] = rounding_key(seed, uint32_t(step), k);

    S* param = static_cast<S*>(c.meta.addresses[0][c.tensor]) + c.start;
    S* grad = static_cast<S*>(c.meta.addresses[1][c.tensor]) + c.start;
    M* master = kMaster ? static_cast<M*>(c.meta.addresses[2][c.tensor]) + c.start : nullptr;
    T* state[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) state[s] = static_cast<T*>(c.meta.addresses[3 + s][c.tensor]);

    // Elements per iteration: 16 bytes of the narrowest stream; wider streams take several
    // accesses.
    constexpr int kNarrowest = sizeof(S) < sizeof(T) ? sizeof(S) : sizeof(T);
    constexpr int kVec =
        kVectorBytes / (kMaster && sizeof(M) < size_t(kNarrowest) ? int(sizeof(M)) : kNarrowest);
    bool aligned = is_vector_aligned<kVec>(param) && is_vector_aligned<kVec>(grad);
    if (kMaster) aligned = aligned && is_vector_aligned<kVec>(master);
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      if (Rule::uses_state(VARIANT, s)) {
        state[s] += c.start;
        aligned = aligned && is_vector_aligned<kVec>(state[s]);
      }
    }

    const auto update = [&](S& p_stored, S& g_stored, M& m_stored, T(&st_stored)[kSlots],
                            int64_t index) {
      C p = load_param<St>(p_stored, m_stored);
      C g = C(g_stored);
      C st[kSlots] = {};  // unused slots stay 0, never read uninitialized
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) st[s] = C(st_stored[s]);
      }
      if (UNSCALE) {
        g = g / grad_scale;
        g_stored = S(g);
      }
      g = g * clip;
      Rule::template update<VARIANT, St::kTorchRounding>(p, g, st, k);
      store_param<St>(p, p_stored, m_stored);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) {
          // Two slots' bits come from one hash of the index: the compiler computes it once.
          const uint32_t random =
              St::kStochastic ? rounding_bits(keys, s, uint32_t(c.start + index)) : 0;
          st_stored[s] = store_state<St>(st[s], random);
        }
      }
    };

    const int64_t vector_end = aligned ? c.n - c.n % kVec : 0;
    for (int64_t i = int64_t(threadIdx.x) * kVec; i < vector_end; i += int64_t(blockDim.x) * kVec) {
      S p[kVec], g[kVec];
      M m[kVec] = {};
      T st[kSlots][kVec] = {};
      load_vector<kVec>(param + i, p);
      load_vector<kVec>(grad + i, g);
      if (kMaster) load_vector<kVec>(master + i, m);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) load_vector<kVec>(state[s] + i, st[s]);
      }
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        T element_state[kSlots];
#pragma unroll
        for (int s = 0; s < kSlots; ++s) element_state[s] = st[s][j];
        update(p[j], g[j], m[j], element_state, i + j);
#pragma unroll
        for (int s = 0; s < kSlots; ++s) st[s][j] = element_state[s];
      }
      store_vector<kVec>(param + i, p);
      if (UNSCALE) store_vector<kVec>(grad + i, g);
      if (kMaster) store_vector<kVec>(master + i, m);
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) store_vector<kVec>(state[s] + i, st[s]);
      }
    }
    for (int64_t i = vector_end + threadIdx.x; i < c.n; i += blockDim.x) {
      M m{};
      if (kMaster) m = master[i];
      T st[kSlots] = {};
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) st[s] = state[s][i];
      }
      update(param[i], grad[i], m, st, i);
      if (kMaster) master[i] = m;
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) state[s][i] = st[s];
      }
    }
  }
};

// One multi-tensor pass over every param, with the call's variant and scaling.
template <typename Rule, int VARIANT = 0>
void launch_step(const std::array<std::vector<at::Tensor>, 3 + Rule::kStateSlots>& lists,
                 const std::vector<at::Tensor>& steps, const std::vector<uint64_t>& tags,
                 const DeviceStepArgs<Rule>& args, int variant) {
  constexpr int kDepth = 3 + Rule::kStateSlots;
  if constexpr (VARIANT < Rule::kVariants) {
    if (variant != VARIANT)
      return launch_step<Rule, VARIANT + 1>(lists, steps, tags, args, variant);
    if (args.grad_scale != nullptr) {
      multi_tensor_apply<kDepth>(lists, steps, StepFunctor<Rule, VARIANT, true>(), args, tags);
    } else {
      multi_tensor_apply<kDepth>(lists, steps, StepFunctor<Rule, VARIANT, false>(), args, tags);
    }
  }
}

// The clip coefficient for the norm in device memory, computed in the norm's dtype; 1 without.
__device__ __forceinline__ double clip_coefficient_on_device(const DeviceScalar& norm,
                                                             double max_grad_norm) {
  if (norm.f64 != nullptr) return clip_coefficient(*norm.f64, max_grad_norm);
  if (norm.f32 != nullptr) return clip_coefficient(*norm.f32, max_grad_norm);
  return 1.0;
}

inline DeviceScalar device_scalar(const std::optional<at::Tensor>& t) {
  DeviceScalar result;
  if (t.has_value() && t->scalar_type() == at::kDouble) {
    result.f64 = t->const_data_ptr<double>();
  } else if (t.has_value()) {
    result.f32 = t->const_data_ptr<float>();
  }
  return result;
}

// The device address of a checked float32 scalar tensor, or nullptr.
inline const float* float_pointer(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<float>() : nullptr;
}

inline LearningRate learning_rate(double lr, const std::optional<at::Tensor>& lr_tensor,
                                  at::Device device) {
  LearningRate result;
  if (!lr_tensor.has_value()) {
    result.value = lr;
  } else if (lr_tensor->device() != device) {  // on the CPU: read by the host
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
  constexpr int kDepth = 3 + Rule::kStateSlots;
  check_step_call(call, kKernelDevice);
  if (call.params.empty()) return;
  const at::Device device = call.params[0].device();
  const DeviceGuard guard(device);
  const DeviceStepArgs<Rule> args{call.options,
                                  learning_rate(call.lr, call.lr_tensor, device),
                                  float_pointer(call.grad_scale),
                                  float_pointer(call.found_inf),
                                  device_scalar(call.grad_norm),
                                  call.max_grad_norm};

  // One pass for every param, whatever its dtype, master copy and state dtype (its tag says).
  const size_t n = call.params.size();
  std::array<std::vector<at::Tensor>, kDepth> lists;
  for (auto& list : lists) list.reserve(n);
  std::vector<uint64_t> tags(n);
  for (size_t i = 0; i < n; ++i) {
    lists[0].push_back(call.params[i]);
    lists[1].push_back(call.grads[i]);
    const bool has_master = !call.masters.empty() && call.masters[i].has_value();
    lists[2].push_back(has_master ? *call.masters[i] : at::Tensor());
    for (int s = 0; s < Rule::kStateSlots; ++s) {
      lists[3 + s].push_back(Rule::uses_state(call.variant, s) ? call.states[s][i] : at::Tensor());
    }
    const uint32_t seed = call.rounding_seeds.empty() ? 0 : rounding_seed32(call.rounding_seeds[i]);
    tags[i] = step_tag(storage_layout_of(call, i), seed);
  }
  const std::vector<at::Tensor> steps(call.steps.begin(), call.steps.end());
  launch_step<Rule>(lists, steps, tags, args, call.variant);
  increment_steps(steps, args.found_inf);
}

}  // namespace fastopt::cuda
