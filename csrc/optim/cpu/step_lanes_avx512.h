// The hand-vectorized AVX-512 step loop: the element body of optim/cpu/multi_tensor_step.h run
// on 16 elements at a time (LanesAt, the 16-lane form of the scalar loop's ElementAt), with the
// storage conversions of optim/cpu/storage_lanes_avx512.h.
//
// Compiled for AVX-512 only (cpu/vec512.h); used by optim/cpu/multi_tensor_step.h.
#pragma once

#if defined(__x86_64__)

#include <cstdint>

#include "cpu/vec512.h"
#include "optim/cpu/prefetched_loop.h"
#include "optim/cpu/storage_lanes_avx512.h"
#include "optim/step_storage.h"

namespace fastopt::cpu::lanes {

// Sixteen consecutive elements from index `i` (those of `lanes`), as the step loop's element body
// sees them (optim/cpu/multi_tensor_step.h; ElementAt is the scalar loop's one element).
struct LanesAt {
  int64_t i;
  LaneMask lanes;
  uint32_t weyl;         // lane 0's Weyl term
  __m512i weyl_offsets;  // lane_weyl_offsets(), made once per loop

  template <typename C>
  using Value = FloatLanes;

  template <typename C, typename T>
  FASTOPT_AVX512_INLINE FloatLanes load(const T* stream) const {
    return load_lanes(stream + i, lanes);
  }

  template <typename T>
  FASTOPT_AVX512_INLINE void store(T* stream, FloatLanes x) const {
    store_lanes(stream + i, x, lanes);
  }

  template <typename St>
  FASTOPT_AVX512_INLINE FloatLanes load_param(const typename St::Param* param,
                                              const MasterElement<St>* master) const {
    if constexpr (St::kMaster == MasterKind::kFloat) {
      return load<float>(master);
    } else if constexpr (St::kMaster == MasterKind::kBf16Remainder) {
      return load_lanes_joined(param + i, master + i, lanes);
    } else {
      return load<float>(param);
    }
  }

  template <typename St>
  FASTOPT_AVX512_INLINE void store_param(FloatLanes p, typename St::Param* param,
                                         MasterElement<St>* master) const {
    if constexpr (St::kMaster == MasterKind::kBf16Remainder) {
      store_lanes_split(param + i, master + i, p, lanes);
    } else {
      if constexpr (St::kMaster == MasterKind::kFloat) store(master, p);
      store(param, p);
    }
  }

  template <typename St>
  FASTOPT_AVX512_INLINE void store_state(typename St::State* stream, FloatLanes x,
                                         const uint32_t* keys, int slot) const {
    if constexpr (St::kStochastic) {
      store_lanes_stochastic(stream + i, x, rounding_bits_lanes(keys, slot, weyl, weyl_offsets),
                             lanes);
    } else {
      store(stream, x);
    }
  }
};

}  // namespace fastopt::cpu::lanes

namespace fastopt::cpu {

// body(LanesAt) for the elements [begin, end), 16 at a time (the last ones masked), prefetching
// `streams` (null ones skipped) ahead as prefetched_loop does.
template <typename Body, typename... Streams>
FASTOPT_AVX512_INLINE void prefetched_lanes_loop(int64_t begin, int64_t end, const Body& body,
                                                 const Streams*... streams) {
  // The compiler does not inline this loop into its caller, so it must assume that the stores
  // through the streams may change the caller's `body` and reload and broadcast its captures
  // (the update's coefficients) for every vector; its own copy it keeps in registers.
  const Body own_body = body;
  using lanes::LaneMask;
  const __m512i weyl_offsets = lanes::lane_weyl_offsets();
  const auto lanes_from = [&](int64_t i, LaneMask lanes) FASTOPT_INLINE_LAMBDA {
    own_body(lanes::LanesAt{i, lanes, uint32_t(i) * kWeylStep, weyl_offsets});
  };
  static_assert(kPrefetchBlock % lanes::kLanes == 0, "a block is whole vectors");
  constexpr LaneMask kAll{lanes::kAllLanes};
  int64_t i = begin;
  for (; i + kPrefetchBlock <= end; i += kPrefetchBlock) {
    (prefetch_block_ahead(streams, i), ...);
    for (int64_t v = 0; v < kPrefetchBlock; v += lanes::kLanes) lanes_from(i + v, kAll);
  }
  for (; i + lanes::kLanes <= end; i += lanes::kLanes) lanes_from(i, kAll);
  if (i < end) lanes_from(i, LaneMask{__mmask16((1u << (end - i)) - 1)});
}

}  // namespace fastopt::cpu

#endif  // __x86_64__
