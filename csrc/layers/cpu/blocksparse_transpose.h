// Square tiles transposed in registers, and the conversions between a vector of floats and S
// (float or bfloat16) memory: the block-sparse dsd products read the dense operand transposed
// (batch rows along the vector) and produce their output transposed, so both the packing and the
// output write move every element across a transpose; done lane by lane, these two cost a large
// share of a sparse product.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

#include "common/macros.h"
#include "layers/cpu/blocksparse_tile.h"

namespace fastopt::cpu::blocksparse {

// r (V::kLanes vectors, the rows of a kLanes x kLanes tile) becomes its transpose: log2(kLanes)
// rounds, round d swapping the off-diagonal d x d sub-blocks of every 2d x 2d block with one
// two-vector shuffle per row.
template <typename V>
FASTOPT_INLINE void transpose_tile(typename V::T (&r)[V::kLanes]) {
  constexpr int kLanes = V::kLanes;
  if constexpr (kLanes > 1) {
    for (int d = kLanes / 2; d >= 1; d /= 2) {
      typename V::Lanes low, high;  // constant once the loops are unrolled
      for (int l = 0; l < kLanes; ++l) {
        low[l] = (l & d) ? kLanes + l - d : l;
        high[l] = (l & d) ? kLanes + l : l + d;
      }
      for (int i = 0; i < kLanes; ++i) {
        if (i & d) continue;
        const typename V::T a = r[i], b = r[i + d];
        r[i] = __builtin_shuffle(a, b, low);
        r[i + d] = __builtin_shuffle(a, b, high);
      }
    }
  }
}

// V::kLanes elements of S at p, as floats.
template <typename V, typename S>
FASTOPT_INLINE typename V::T load_as_float(const S* p) {
  if constexpr (std::is_same_v<S, float>) {
    return V::load(p);
  } else {
    alignas(64) float lanes[V::kLanes];
    for (int l = 0; l < V::kLanes; ++l) lanes[l] = float(p[l]);
    return V::load(lanes);
  }
}

// Stores v at p as V::kLanes elements of S (bfloat16 rounded to nearest even, as S(float)).
template <typename V, typename S>
FASTOPT_INLINE void store_as(S* p, const typename V::T& v) {
  if constexpr (std::is_same_v<S, float>) {
    V::store(p, v);
  } else {
    alignas(64) float lanes[V::kLanes];
    V::store(lanes, v);
    for (int l = 0; l < V::kLanes; ++l) p[l] = S(lanes[l]);
  }
}

}  // namespace fastopt::cpu::blocksparse
