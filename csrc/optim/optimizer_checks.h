// Input checks shared by every multi-tensor optimizer op, on every device. They run before any
// tensor is touched, so a failed check leaves params and state as they were.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/flat_hash_map.h>

#include <optional>

#include "optim/metadata_prefetch.h"

namespace fastopt {

// A list checked against the params element by element: grads have their param's dtype; state
// may also be kept in another dtype (is_supported_state_dtype).
struct CompanionList {
  const char* name;
  at::TensorList list;
  bool is_state;
};

// Whether t's elements sit at the same memory offsets as p's, both of one shape: strides must
// agree except in dimensions of size 1, where they never matter (autograd may set them apart).
inline bool same_element_offsets(const at::Tensor& t, const at::Tensor& p) {
  const auto t_strides = t.strides();
  const auto p_strides = p.strides();
  const auto sizes = p.sizes();
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (sizes[d] > 1 && t_strides[d] != p_strides[d]) return false;
  }
  return true;
}

inline bool is_supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// Finds a tensor listed twice in one call: a param (or step counter) that appears twice would be
// updated twice, once per occurrence on the CPU and in a race on the GPU. One hash lookup per
// tensor.
class RepeatedTensorCheck {
 public:
  RepeatedTensorCheck(const char* op, const char* list, size_t size) : op_(op), list_(list) {
    first_index_.reserve(size);
  }

  void add(const at::Tensor& t, size_t i) {
    // Meta and fake tensors (shape checks, torch.compile, symbolic shapes) have no memory to
    // compare; empty tensors none to update.
    if (t.is_meta() || t.unsafeGetTensorImpl()->has_symbolic_sizes_strides() || t.numel() == 0) {
      return;
    }
    const auto [entry, inserted] = first_index_.emplace(t.const_data_ptr(), i);
    TORCH_CHECK(inserted, op_, ": ", list_, "[", i, "] is ", list_, "[", entry->second,
                "] again (the same memory); list each tensor once: one listed twice would be "
                "updated twice");
  }

 private:
  const char* op_;
  const char* list_;
  ska::flat_hash_map<const void*, size_t> first_index_;
};

// `params` and each list in `companions` (grads and per-element state) are checked element by
// element: same device, shape and memory layout as the param, dense storage, supported dtype
// (grads: the param's own; state: one dtype for all of a param's state lists, which the caller
// checks against the param's). `steps` holds one float32 step counter per param on the params'
// device. No param and no step counter may appear twice.
inline void check_optimizer_tensors(const char* op, at::TensorList params,
                                    c10::ArrayRef<CompanionList> companions, at::TensorList steps,
                                    c10::DeviceType device_type) {
  for (const auto& [name, list, is_state] : companions) {
    TORCH_CHECK(list.size() == params.size(), op, ": ", name, " has ", list.size(),
                " tensors but params has ", params.size());
  }
  TORCH_CHECK(steps.size() == params.size(), op, ": steps has ", steps.size(),
              " tensors but params has ", params.size());
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK(device.type() == device_type, op, ": params are on ", device, ", expected ",
              c10::DeviceTypeName(device_type));
  RepeatedTensorCheck repeated_params(op, "params", params.size());
  RepeatedTensorCheck repeated_steps(op, "steps", steps.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const size_t ahead = i + kMetadataPrefetchDistance;
    prefetch_tensor_metadata(params, ahead);
    prefetch_tensor_metadata(steps, ahead);
    for (const auto& companion : companions) prefetch_tensor_metadata(companion.list, ahead);
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", device, "; one call takes tensors of one device");
    TORCH_CHECK(is_supported_param_dtype(p.scalar_type()), op, ": params[", i, "] has dtype ",
                p.scalar_type(), "; supported are float32, float64, float16 and bfloat16");
    TORCH_CHECK(p.layout() == at::kStrided && p.is_non_overlapping_and_dense(), op, ": params[", i,
                "] is not stored densely (a strided view?); make it contiguous first");
    const at::Tensor* first_state = nullptr;
    for (const auto& [name, list, is_state] : companions) {
      const at::Tensor& t = list[i];
      TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i, "] has layout ", t.layout(),
                  "; only dense (strided) tensors are supported (for a sparse gradient use "
                  "torch.optim.SparseAdam, or make the gradient dense)");
      TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(),
                  " but params are on ", device);
      if (!is_state) {
        TORCH_CHECK(t.scalar_type() == p.scalar_type(), op, ": ", name, "[", i, "] has dtype ",
                    t.scalar_type(), " but params[", i, "] has ", p.scalar_type());
      } else if (first_state == nullptr) {
        first_state = &t;  // which dtypes go with the param's is the storage layout's question
      } else {
        TORCH_CHECK(t.scalar_type() == first_state->scalar_type(), op, ": ", name, "[", i,
                    "] has dtype ", t.scalar_type(), " but the other state of params[", i, "] has ",
                    first_state->scalar_type(), "; keep a param's state in one dtype");
      }
      TORCH_CHECK(t.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ", t.sizes(),
                  " but params[", i, "] has ", p.sizes());
      TORCH_CHECK(same_element_offsets(t, p), op, ": ", name, "[", i, "] has strides ", t.strides(),
                  " but params[", i, "] has ", p.strides(), "; give it the param's memory layout");
    }
    const at::Tensor& s = steps[i];
    TORCH_CHECK(s.numel() == 1 && s.scalar_type() == at::kFloat && s.device() == device, op,
                ": steps[", i, "] must be a one-element float32 tensor on ", device, ", got ",
                s.scalar_type(), " ", s.sizes(), " on ", s.device());
    repeated_params.add(p, i);
    repeated_steps.add(s, i);
  }
}

// A one-element tensor such as lr_tensor, grad_scale or found_inf: float32 (or also float64,
// where `float64_allowed`), on `device` (or also on the CPU, where `cpu_allowed`: a value the
// host reads without waiting for the device). GradScaler's tensors are float32 on its device.
inline void check_scalar_tensor(const char* op, const char* name,
                                const std::optional<at::Tensor>& t, at::Device device,
                                bool cpu_allowed = false, bool float64_allowed = false) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->numel() == 1, op, ": ", name, " must have one element, got shape ", t->sizes());
  TORCH_CHECK(
      t->scalar_type() == at::kFloat || (float64_allowed && t->scalar_type() == at::kDouble), op,
      ": ", name, " must be float32", float64_allowed ? " or float64" : "", ", got ",
      t->scalar_type());
  TORCH_CHECK(t->device() == device || (cpu_allowed && t->device().is_cpu()), op, ": ", name,
              " is on ", t->device(), ", expected ", device);
}

}  // namespace fastopt
