// Element helpers every optimizer's step math uses, with torch's exact semantics. Each takes the
// element values as V: the compute type C itself, or (cpu/vec512.h, vec256.h) a vector of float
// lanes, which brings its own operators and `where`; scalar operands (coefficients) stay C.
#pragma once

#include <cmath>

#include "common/macros.h"

namespace fastopt {

#if !defined(__CUDACC__)
using std::pow;
using std::sqrt;
#endif

// condition ? a : b.
template <typename V>
FASTOPT_HOST_DEVICE FASTOPT_INLINE V where(bool condition, V a, V b) {
  return condition ? a : b;
}

// torch.lerp: the two-sided formula keeps the result exact at weight 0 and 1.
template <typename V, typename C>
FASTOPT_HOST_DEVICE FASTOPT_INLINE V lerp(V self, V end, C weight) {
  return (weight < C(0.5) && weight > C(-0.5)) ? self + weight * (end - self)
                                               : end - (end - self) * (C(1) - weight);
}

// torch.maximum: NaN in either operand gives NaN.
template <typename V>
FASTOPT_HOST_DEVICE FASTOPT_INLINE V nan_propagating_max(V a, V b) {
  return where((a > b) | (a != a), a, b);
}

}  // namespace fastopt
