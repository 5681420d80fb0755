// Prefetching tensor metadata for loops over thousands of tensors.
//
// After forward and backward, the TensorImpl of each param, grad and state
// tensor are cold; a loop that reads them one tensor at a time waits for each miss in turn.
// Asking for tensor i + kMetadataPrefetchDistance's while working on tensor i lets the misses
// overlap.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace fastopt {

constexpr size_t kMetadataPrefetchDistance = 8;

// The TensorImpl of list[i]: sizes, strides, dtype, device, flags (its first four lines).
inline void prefetch_tensor_metadata(at::TensorList list, size_t i) {
  if (i >= list.size()) return;
  const char* impl = reinterpret_cast<const char*>(list[i].unsafeGetTensorImpl());
  for (int line = 0; line < 4; ++line) __builtin_prefetch(impl + 64 * line);
}

}  // namespace fastopt
