// One call of a multi-tensor optimizer op, whatever its update rule, and its input checks.
//
// An optimizer is an update rule (optim/*_rule.h), a struct with:
//   kOpName: its op, "fastopt::<name>_step_" (listed in the op table, optim/step_ops.h);
//   kStateSlots, kStateNames[slot], kStateNeeds[slot]: its per-element state tensors (the op's
//       state lists in schema order), and the option without which a slot is unused ("" if
//       always used);
//   kVariants, uses_state(variant, slot): the kernel instantiations; a variant fixes which
//       state slots are read and written, since that changes the memory traffic;
//   Options, configure(own arguments...): its hyperparameters, made from the op's own arguments
//       (whose types, in schema order, are configure's parameters), with the variant;
//   Coefficients<C>, coefficients<C>(options, lr, step): what one tensor's update needs beyond
//       its elements, derived once per tensor and step;
//   update<VARIANT, TORCH_ROUNDING>(param, grad, state[kStateSlots], coefficients): the math of
//       one element, with the grad already unscaled. The element values are of a type V, the
//       coefficients' scalar type C or (the AVX-512 and AVX2 loops, cpu/vec512.h and vec256.h) 16
//       or 8 float lanes, so it is written with operators, sqrt, lerp and where; where
//       TORCH_ROUNDING is false (the param or its state is stored in 16 bits:
//       Storage::kTorchRounding), it may trade an operation torch rounds correctly for a cheaper
//       one within about an ulp of float32.
// The op's signature and kernels follow from it (optim/step_op.h); the CPU driver
// (optim/cpu/multi_tensor_step.h) and the CUDA one (optim/cuda/multi_tensor_step.cuh) do
// everything else: checks, scheduling, unscaling, clipping, found_inf, step counts, a tensor lr,
// master copies and the storage of state (optim/step_storage.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "optim/optimizer_checks.h"
#include "optim/step_storage.h"

namespace fastopt {

template <typename Rule>
struct StepCall {
  const char* op;
  at::TensorList params;
  at::TensorList grads;
  std::array<at::TensorList, Rule::kStateSlots> states;  // empty where the variant has no use
  at::TensorList steps;
  int variant;
  typename Rule::Options options;
  double lr;  // unless lr_tensor is given
  std::optional<at::Tensor> lr_tensor;
  std::optional<at::Tensor> grad_scale;  // divide the grads by it, and store them back unscaled
  std::optional<at::Tensor> found_inf;   // nonzero: skip the step entirely
  // Empty, or one per param: its float32 master copy (or int16 remainder of one, for a bfloat16
  // param), or nullopt for a param updated in its own dtype.
  std::vector<std::optional<at::Tensor>> masters;
  std::optional<at::Tensor> grad_norm;  // the grads' total norm: clip them to max_grad_norm
  double max_grad_norm;
  at::IntArrayRef rounding_seeds;  // empty, or one per param: bfloat16 state rounds stochastically
};

// The clip coefficient of torch.nn.utils.clip_grad_norm_, computed in the norm's dtype N as
// torch computes it: min(max_norm / (norm + 1e-6), 1).
template <typename N>
FASTOPT_HOST_DEVICE inline N clip_coefficient(N norm, double max_norm) {
  const N coefficient = N(max_norm) / (norm + N(1e-6));
  return coefficient < N(1) ? coefficient : N(1);
}

inline MasterKind master_kind(const std::optional<at::Tensor>& master) {
  if (!master.has_value()) return MasterKind::kNone;
  return master->scalar_type() == at::kShort ? MasterKind::kBf16Remainder : MasterKind::kFloat;
}

// The storage layout of a param of dtype `param` with state of dtype `state`.
inline StorageLayout storage_layout(at::ScalarType param, at::ScalarType state, MasterKind master,
                                    bool stochastic) {
  stochastic = stochastic && state == at::kBFloat16;
#define FASTOPT_LAYOUT_MATCH(code, S, T, M, STOCHASTIC)                         \
  if (param == c10::CppTypeToScalarType<S>::value &&                            \
      state == c10::CppTypeToScalarType<T>::value && master == MasterKind::M && \
      stochastic == STOCHASTIC) {                                               \
    return StorageLayout::code;                                                 \
  }
  FASTOPT_STORAGE_LAYOUTS(FASTOPT_LAYOUT_MATCH)
#undef FASTOPT_LAYOUT_MATCH
  return StorageLayout::kUnsupported;
}

// The dtype of params[i]'s state in `call` (every used slot has the first's: checked).
template <typename Rule>
at::ScalarType state_dtype_of(const StepCall<Rule>& call, size_t i) {
  for (int slot = 0; slot < Rule::kStateSlots; ++slot) {
    if (Rule::uses_state(call.variant, slot)) return call.states[slot][i].scalar_type();
  }
  return call.params[i].scalar_type();
}

// The storage layout of params[i] in `call`.
template <typename Rule>
StorageLayout storage_layout_of(const StepCall<Rule>& call, size_t i) {
  return storage_layout(call.params[i].scalar_type(), state_dtype_of(call, i),
                        call.masters.empty() ? MasterKind::kNone : master_kind(call.masters[i]),
                        !call.rounding_seeds.empty());
}

// A rounding seed as the kernels use it: 32 bits that depend on all 64 of the given one.
inline uint32_t rounding_seed32(int64_t seed) {
  const auto bits = static_cast<uint64_t>(seed);
  return mix32(uint32_t(bits) ^ mix32(uint32_t(bits >> 32)));
}

// Checks params[i]'s master copy, if any.
inline void check_master(const char* op, const at::Tensor& p, const at::Tensor& master, size_t i) {
  const bool bf16 = p.scalar_type() == at::kBFloat16;
  TORCH_CHECK(bf16 || p.scalar_type() == at::kHalf, op, ": masters[", i, "] is given but params[",
              i, "] is ", p.scalar_type(),
              "; a master copy is for a float16 or bfloat16 param (pass None for the others)");
  TORCH_CHECK(master.scalar_type() == at::kFloat || (bf16 && master.scalar_type() == at::kShort),
              op, ": masters[", i, "] has dtype ", master.scalar_type(),
              "; a master copy is float32 (or, for a bfloat16 param, int16: the remainder form)");
  TORCH_CHECK(master.layout() == at::kStrided && master.device() == p.device(), op, ": masters[", i,
              "] must be a dense tensor on ", p.device(), ", got ", master.layout(), " on ",
              master.device());
  TORCH_CHECK(master.sizes() == p.sizes(), op, ": masters[", i, "] has shape ", master.sizes(),
              " but params[", i, "] has ", p.sizes());
  TORCH_CHECK(same_element_offsets(master, p), op, ": masters[", i, "] has strides ",
              master.strides(), " but params[", i, "] has ", p.strides(),
              "; give it the param's memory layout");
}

// Checks everything before anything changes: a failed check leaves params and state as they were.
template <typename Rule>
void check_step_call(const StepCall<Rule>& call, c10::DeviceType device_type) {
  std::vector<CompanionList> companions{{"grads", call.grads, false}};
  for (int slot = 0; slot < Rule::kStateSlots; ++slot) {
    if (Rule::uses_state(call.variant, slot)) {
      companions.push_back({Rule::kStateNames[slot], call.states[slot], true});
    } else {
      TORCH_CHECK(call.states[slot].empty(), call.op, ": ", Rule::kStateNames[slot],
                  " must be empty without ", Rule::kStateNeeds[slot]);
    }
  }
  check_optimizer_tensors(call.op, call.params, companions, call.steps, device_type);
  const size_t n = call.params.size();
  TORCH_CHECK(call.masters.empty() || call.masters.size() == n, call.op, ": masters has ",
              call.masters.size(), " entries but params has ", n, " (pass one per param, or none)");
  TORCH_CHECK(call.rounding_seeds.empty() || call.rounding_seeds.size() == n, call.op,
              ": rounding_seeds has ", call.rounding_seeds.size(), " entries but params has ", n,
              " (pass one per param, or none)");
  if (!call.masters.empty()) {
    RepeatedTensorCheck repeated_masters(call.op, "masters", n);
    for (size_t i = 0; i < n; ++i) {
      if (!call.masters[i].has_value()) continue;
      check_master(call.op, call.params[i], *call.masters[i], i);
      repeated_masters.add(*call.masters[i], i);
    }
  }
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(storage_layout_of(call, i) != StorageLayout::kUnsupported, call.op, ": params[", i,
                "] is ", call.params[i].scalar_type(), " with state of dtype ",
                state_dtype_of(call, i),
                call.masters.empty() || !call.masters[i].has_value() ? "" : " and a master copy",
                ", which is not supported: state is kept in the param's dtype, in float32 (for a "
                "float16 or bfloat16 param), or in bfloat16 (for a float32 or bfloat16 param, or "
                "a float16 one with a master copy)");
  }
  if (call.grad_norm.has_value()) {
    TORCH_CHECK(call.max_grad_norm > 0 && std::isfinite(call.max_grad_norm), call.op,
                ": max_grad_norm must be a positive finite number, got ", call.max_grad_norm);
  }
  if (call.params.empty() && device_type != c10::DeviceType::CPU) return;
  const at::Device device =
      call.params.empty() ? at::Device(c10::DeviceType::CPU) : call.params[0].device();
  check_scalar_tensor(call.op, "lr_tensor", call.lr_tensor, device, /*cpu_allowed=*/true,
                      /*float64_allowed=*/true);
  check_scalar_tensor(call.op, "grad_scale", call.grad_scale, device);
  check_scalar_tensor(call.op, "found_inf", call.found_inf, device);
  check_scalar_tensor(call.op, "grad_norm", call.grad_norm, device, /*cpu_allowed=*/false,
                      /*float64_allowed=*/true);
}

}  // namespace fastopt
