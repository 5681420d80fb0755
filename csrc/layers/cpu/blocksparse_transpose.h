// Square tiles transposed in registers, and the conversions between a vector of floats and S
// (float or bfloat16) memory: the block-sparse dsd products read the dense operand transposed
// (batch rows along the vector) and produce their output transposed, so both the packing and the
// output write move every element across a transpose; done lane by lane, these two cost a large
// share of a sparse product.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>
#include <utility>

#include "common/macros.h"
#include "layers/cpu/blocksparse_tile.h"

namespace fastopt::cpu::blocksparse {

// One round of transpose_tile: the off-diagonal kD x kD sub-blocks of every 2kD x 2kD block of r
// swapped, one two-vector shuffle per row. The masks are built from the lane indices kL at compile
// time: from a loop over the lanes, GCC built them lane by lane at run time.
template <typename V, int kD, int... kL>
FASTOPT_INLINE void transpose_round(typename V::T (&r)[V::kLanes],
                                    std::integer_sequence<int, kL...>) {
  constexpr int kLanes = V::kLanes;
  const typename V::Lanes low = {((kL & kD) ? kLanes + kL - kD : kL)...};
  const typename V::Lanes high = {((kL & kD) ? kLanes + kL : kL + kD)...};
  for (int i = 0; i < kLanes; ++i) {
    if (i & kD) continue;
    const typename V::T a = r[i], b = r[i + kD];
    r[i] = __builtin_shuffle(a, b, low);
    r[i + kD] = __builtin_shuffle(a, b, high);
  }
}

// The rounds of transpose_tile from sub-blocks of kD x kD down to 1 x 1.
template <typename V, int kD>
FASTOPT_INLINE void transpose_rounds(typename V::T (&r)[V::kLanes]) {
  if constexpr (kD >= 1) {
    transpose_round<V, kD>(r, std::make_integer_sequence<int, V::kLanes>{});
    transpose_rounds<V, kD / 2>(r);
  }
}

// r (V::kLanes vectors, the rows of a kLanes x kLanes tile) becomes its transpose: log2(kLanes)
// rounds, round d swapping the off-diagonal d x d sub-blocks of every 2d x 2d block.
template <typename V>
FASTOPT_INLINE void transpose_tile(typename V::T (&r)[V::kLanes]) {
  transpose_rounds<V, V::kLanes / 2>(r);
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
