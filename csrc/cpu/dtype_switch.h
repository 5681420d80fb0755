// Picks a kernel instantiation by the params' dtype with a plain switch. ATen's AT_DISPATCH
// macros wrap the kernel in a lambda, and a lambda does not inherit the target attribute of a
// per-instruction-set variant (isa.h); a switch over always-inline calls does.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include "common/macros.h"

namespace fastopt::cpu {

// Calls Loop::template run<S>(args) with S the C++ type of `dtype`.
template <typename Loop, typename Args>
FASTOPT_INLINE void switch_param_dtype(c10::ScalarType dtype, const Args& args) {
  switch (dtype) {
    case c10::ScalarType::Float:
      return Loop::template run<float>(args);
    case c10::ScalarType::Double:
      return Loop::template run<double>(args);
    case c10::ScalarType::Half:
      return Loop::template run<c10::Half>(args);
    case c10::ScalarType::BFloat16:
      return Loop::template run<c10::BFloat16>(args);
    default:
      TORCH_CHECK(false, "fastopt: unsupported param dtype ", dtype);
  }
}

}  // namespace fastopt::cpu
