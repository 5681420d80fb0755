// The CPU driver of every multi-tensor optimizer op: all tensors of a call in one parallel
// region, one pass over memory, the element loop compiled per instruction set and per storage
// layout (optim/step_storage.h: master copies, state dtypes). Every rule of the op table is
// registered with it in optim/cpu/step_ops.cpp, its loops compiled in optim/cpu/step_pieces_*.cpp.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <utility>
#include <vector>

#include "common/macros.h"
#include "optim/cpu/multi_tensor.h"
#include "optim/cpu/prefetched_loop.h"
#include "optim/cpu/step_element.h"
#include "optim/cpu/step_lanes.h"
#include "optim/step_call.h"

namespace fastopt::cpu {

// Where one param and its state live, gathered before the parallel region: the threads then
// read one compact array instead of each tensor's metadata, which is cold after backward().
template <typename Rule>
struct StepTensor {
  StorageLayout layout;
  void* param;
  void* grad;
  void* master;  // null without a master copy
  std::array<void*, Rule::kStateSlots> state;
  // The keys of the random streams of stochastic rounding (step_storage.h: two slots a stream).
  std::array<uint32_t, rounding_streams(Rule::kStateSlots)> rounding_keys;
  typename Rule::template Coefficients<float> coefficients_float;
  typename Rule::template Coefficients<double> coefficients_double;

  template <typename C>
  FASTOPT_INLINE const typename Rule::template Coefficients<C>& coefficients() const {
    if constexpr (std::is_same_v<C, float>) {
      return coefficients_float;
    } else {
      return coefficients_double;
    }
  }
};

// One contiguous element range of one param and its state.
template <typename Rule>
struct StepPiece {
  const StepTensor<Rule>* tensor;
  int variant;
  bool unscale;  // divide grads by grad_scale and store them back unscaled, as torch's fused does
  double grad_scale;
  double clip_coefficient;  // what the (unscaled) grads are multiplied by: 1 without clipping
  int64_t begin;
  int64_t end;
};

// The Weyl term (step_storage.h) of each offset j within a block of prefetched_loop: j *
// kWeylStep. Read from this table, an element's Weyl term is the block's plus one vector load;
// written as a product, the compiler folds block * kWeylStep + j * kWeylStep back into
// (block + j) * kWeylStep, a vector multiplication for every 16 elements.
constexpr std::array<uint32_t, kPrefetchBlock> weyl_terms_of_block_offsets() {
  std::array<uint32_t, kPrefetchBlock> terms{};
  for (uint32_t j = 0; j < uint32_t(kPrefetchBlock); ++j) terms[j] = j * kWeylStep;
  return terms;
}
inline constexpr std::array<uint32_t, kPrefetchBlock> kBlockOffsetWeyl =
    weyl_terms_of_block_offsets();

// How a step loop runs its element body (optim/cpu/step_lanes.h for the hand-vectorized ones).
enum class StepLanes {
  kCompilerVectorized,  // the compiler vectorizes the scalar element body (every instruction set)
  kAvx2,                // 8 float lanes at a time (AVX2 variants only)
  kAvx512,              // 16 float lanes at a time (AVX-512 variants only)
};

// The element loop of one piece, run as LANES says; float64 layouts always take the compiler's
// loop (the lanes are float).
template <typename Rule, int VARIANT, bool UNSCALE, StepLanes LANES>
struct StepLoop {
  static constexpr int kSlots = Rule::kStateSlots;
#if defined(__x86_64__)
  template <typename C>
  static constexpr bool kRunsOnLanes =
      LANES != StepLanes::kCompilerVectorized && std::is_same_v<C, float>;
#else
  template <typename C>
  static constexpr bool kRunsOnLanes = false;
#endif

  template <typename St>
  FASTOPT_INLINE static void run(const StepPiece<Rule>& a) {
    using S = typename St::Param;
    using T = typename St::State;
    using C = typename St::Compute;
    using Master = MasterElement<St>;
    const StepTensor<Rule>& t = *a.tensor;
    const auto k = t.template coefficients<C>();
    const C grad_scale = C(a.grad_scale);
    const C clip_coefficient = C(a.clip_coefficient);
    S* __restrict__ param = static_cast<S*>(t.param);
    S* __restrict__ grad = static_cast<S*>(t.grad);
    Master* __restrict__ master = static_cast<Master*>(t.master);
    std::array<T*, kSlots> state;
    for (int s = 0; s < kSlots; ++s) state[s] = static_cast<T*>(t.state[s]);
    const auto rounding_keys = t.rounding_keys;
    // The elements `at` (one, or a vector of lanes): every stream is read and written at those
    // only. Captured by value, so that a loop may keep its own copy (lanes_loop).
    const auto elements = [=](const auto& at) FASTOPT_INLINE_LAMBDA {
      using V = typename std::decay_t<decltype(at)>::template Value<C>;
      V p = at.template load_param<St>(param, master);
      V g = at.template load<C>(grad);
      V st[kSlots] = {};
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) st[s] = at.template load<C>(state[s]);
      }
      if constexpr (UNSCALE) {
        g = g / grad_scale;
        at.store(grad, g);
      }
      g = g * clip_coefficient;
      Rule::template update<VARIANT, St::kTorchRounding>(p, g, st, k);
      at.template store_param<St>(p, param, master);
      for (int s = 0; s < kSlots; ++s) {
        if (Rule::uses_state(VARIANT, s)) {
          at.template store_state<St>(state[s], st[s], rounding_keys.data(), s);
        }
      }
    };
    if constexpr (kRunsOnLanes<C>) {
      with_streams(
          [&](const auto*... streams) FASTOPT_INLINE_LAMBDA {
            if constexpr (LANES == StepLanes::kAvx512) {
              prefetched_lanes_loop_avx512(a.begin, a.end, elements, streams...);
            } else {
              prefetched_lanes_loop_avx2(a.begin, a.end, elements, streams...);
            }
          },
          param, grad, master, state, std::make_index_sequence<kSlots>());
    } else {
      const auto element = [&](int64_t block, int32_t j) FASTOPT_INLINE_LAMBDA {
        // The Weyl term as the block's plus the offset's (kBlockOffsetWeyl).
        elements(ElementAt{block + j, uint32_t(block) * kWeylStep + kBlockOffsetWeyl[j]});
      };
      with_streams(
          [&](const auto*... streams)
              FASTOPT_INLINE_LAMBDA { prefetched_loop(a.begin, a.end, element, streams...); },
          param, grad, master, state, std::make_index_sequence<kSlots>());
    }
  }

  // loop(streams...) with every stream the loop prefetches. Unused state slots are null (as is a
  // master that is not there), and the loops skip null streams.
  template <typename Loop, typename S, typename Master, typename T, size_t... SLOT>
  FASTOPT_INLINE static void with_streams(const Loop& loop, S* param, S* grad, Master* master,
                                          const std::array<T*, kSlots>& state,
                                          std::index_sequence<SLOT...>) {
    loop(param, grad, master, state[SLOT]...);
  }
};

// The clip coefficient for a grad norm on the CPU, computed in the norm's dtype; 1 without one.
inline double clip_coefficient_on_cpu(const std::optional<at::Tensor>& grad_norm,
                                      double max_grad_norm) {
  if (!grad_norm.has_value()) return 1.0;
  if (grad_norm->scalar_type() == at::kDouble) {
    return clip_coefficient(grad_norm->item<double>(), max_grad_norm);
  }
  return clip_coefficient(grad_norm->item<float>(), max_grad_norm);
}

// Turns the run-time variant and unscale flag into template arguments, then the dtype. LANES as
// in StepLoop.
template <typename Rule, StepLanes LANES, int VARIANT = 0>
FASTOPT_INLINE void step_piece_body(const StepPiece<Rule>& a) {
  if constexpr (VARIANT < Rule::kVariants) {
    if (a.variant != VARIANT) return step_piece_body<Rule, LANES, VARIANT + 1>(a);
    a.unscale ? switch_storage<StepLoop<Rule, VARIANT, true, LANES>>(a.tensor->layout, a)
              : switch_storage<StepLoop<Rule, VARIANT, false, LANES>>(a.tensor->layout, a);
  }
}

// Runs one checked-in call: `piece` is step_piece_body<Rule> compiled per instruction set.
template <typename Rule, void (*piece)(const StepPiece<Rule>&)>
void run_step_on_cpu(const StepCall<Rule>& call) {
  check_step_call(call, c10::DeviceType::CPU);
  // An inf/NaN gradient was found: the step is skipped entirely, step counts included.
  if (call.found_inf.has_value() && call.found_inf->template item<double>() != 0) return;
  const double lr = call.lr_tensor.has_value() ? call.lr_tensor->template item<double>() : call.lr;

  const size_t n = call.params.size();
  std::vector<int64_t> numels(n);
  std::vector<float> new_steps(n);
  std::vector<StepTensor<Rule>> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    StepTensor<Rule>& t = tensors[i];
    numels[i] = call.params[i].numel();
    new_steps[i] = *call.steps[i].template const_data_ptr<float>() + 1.0f;
    t.layout = storage_layout_of(call, i);
    t.param = call.params[i].data_ptr();
    t.grad = call.grads[i].data_ptr();
    const bool has_master = !call.masters.empty() && call.masters[i].has_value();
    t.master = has_master ? call.masters[i]->data_ptr() : nullptr;
    for (int s = 0; s < Rule::kStateSlots; ++s) {
      t.state[s] = Rule::uses_state(call.variant, s) ? call.states[s][i].data_ptr() : nullptr;
    }
    for (size_t k = 0; k < t.rounding_keys.size(); ++k) {
      t.rounding_keys[k] =
          call.rounding_seeds.empty()
              ? 0
              : rounding_key(rounding_seed32(call.rounding_seeds[i]), uint32_t(new_steps[i]), k);
    }
    if (i > 0 && new_steps[i] == new_steps[i - 1]) {  // the usual case: one count for all
      t.coefficients_float = tensors[i - 1].coefficients_float;
      t.coefficients_double = tensors[i - 1].coefficients_double;
    } else {
      t.coefficients_float = Rule::template coefficients<float>(call.options, lr, new_steps[i]);
      t.coefficients_double = Rule::template coefficients<double>(call.options, lr, new_steps[i]);
    }
  }

  const bool unscale = call.grad_scale.has_value();
  const double scale = unscale ? call.grad_scale->template item<double>() : 1.0;
  const double clip = clip_coefficient_on_cpu(call.grad_norm, call.max_grad_norm);
  for_each_piece_in_parallel(numels, [&](size_t t, int64_t begin, int64_t end) {
    piece(StepPiece<Rule>{&tensors[t], call.variant, unscale, scale, clip, begin, end});
  });
  for (size_t i = 0; i < n; ++i) *call.steps[i].template mutable_data_ptr<float>() = new_steps[i];
}

}  // namespace fastopt::cpu
