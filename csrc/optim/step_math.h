// Element helpers every optimizer's step math uses, with torch's exact semantics.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace fastopt {

#if !defined(__CUDACC__)
using std::pow;
using std::sqrt;
#endif

// torch.lerp: the two-sided formula keeps the result exact at weight 0 and 1.
template <typename C>
FASTOPT_HOST_DEVICE FASTOPT_INLINE C lerp(C self, C end, C weight) {
  return (weight < C(0.5) && weight > C(-0.5)) ? self + weight * (end - self)
                                               : end - (end - self) * (C(1) - weight);
}

// torch.maximum: NaN in either operand gives NaN.
template <typename C>
FASTOPT_HOST_DEVICE FASTOPT_INLINE C nan_propagating_max(C a, C b) {
  return (a > b || a != a) ? a : b;
}

}  // namespace fastopt
