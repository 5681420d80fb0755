// The hand-vectorized step loops: the element body of optim/cpu/multi_tensor_step.h run on a
// vector of float lanes at a time (LanesAt, the vector form of the scalar loop's ElementAt), with
// the storage conversions written by hand. Two forms share the code here: 16 lanes on AVX-512
// (optim/cpu/storage_lanes_avx512.h, the last vector masked) and 8 on AVX2
// (optim/cpu/storage_lanes_avx2.h, whole vectors, the last few elements by the scalar code).
//
// Each form is compiled for its own instruction set only; used by optim/cpu/multi_tensor_step.h.
#pragma once

#if defined(__x86_64__)

#include <cstdint>

#include "optim/cpu/prefetched_loop.h"
#include "optim/cpu/step_element.h"
#include "optim/cpu/storage_lanes_avx2.h"
#include "optim/cpu/storage_lanes_avx512.h"
#include "optim/step_storage.h"

namespace fastopt::cpu::lanes {

// Form::kWidth consecutive elements from index `i` (those of `lanes`), as the step loop's element
// body sees them (optim/cpu/multi_tensor_step.h; ElementAt is the scalar loop's one element).
// Form is Avx512Lanes or Avx2Lanes; the conversions are found by overloading on its types. The
// members are always inlined into the loop of their form, which is compiled for its instruction
// set (they are of the default target themselves, as a rule's update is: cpu/vec512.h).
template <typename Form>
struct LanesAt {
  using Lanes = typename Form::Float;

  int64_t i;
  typename Form::Mask lanes;
  uint32_t weyl;                     // lane 0's Weyl term
  typename Form::Bits weyl_offsets;  // Form::weyl_offsets(), made once per loop

  template <typename C>
  using Value = Lanes;

  template <typename C, typename T>
  FASTOPT_INLINE Lanes load(const T* stream) const {
    return load_lanes(stream + i, lanes);
  }

  template <typename T>
  FASTOPT_INLINE void store(T* stream, Lanes x) const {
    store_lanes(stream + i, x, lanes);
  }

  template <typename St>
  FASTOPT_INLINE Lanes load_param(const typename St::Param* param,
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
  FASTOPT_INLINE void store_param(Lanes p, typename St::Param* param,
                                  MasterElement<St>* master) const {
    if constexpr (St::kMaster == MasterKind::kBf16Remainder) {
      store_lanes_split(param + i, master + i, p, lanes);
    } else {
      if constexpr (St::kMaster == MasterKind::kFloat) store(master, p);
      store(param, p);
    }
  }

  template <typename St>
  FASTOPT_INLINE void store_state(typename St::State* stream, Lanes x, const uint32_t* keys,
                                  int slot) const {
    if constexpr (St::kStochastic) {
      store_lanes_stochastic(stream + i, x, rounding_bits_lanes(keys, slot, weyl, weyl_offsets),
                             lanes);
    } else {
      store(stream, x);
    }
  }
};

// body(LanesAt<Form>) for the elements [begin, end), Form::kWidth at a time, prefetching
// `streams` (null ones skipped) ahead as prefetched_loop does. The elements after the last whole
// vector run as one masked vector, or where the form has no masks, as body(ElementAt) each.
// Always inlined into the form's loop below, which carries its instruction set.
template <typename Form, typename Body, typename... Streams>
FASTOPT_INLINE void lanes_loop(int64_t begin, int64_t end, const Body& body,
                               const Streams*... streams) {
  // The compiler does not inline the form's loop into its caller, so it must assume that the
  // stores through the streams may change the caller's `body` and reload and broadcast its
  // captures (the update's coefficients) for every vector; its own copy it keeps in registers.
  const Body own_body = body;
  constexpr int64_t kWidth = Form::kWidth;
  const typename Form::Bits weyl_offsets = Form::weyl_offsets();
  const auto lanes_from = [&](int64_t i, typename Form::Mask lanes) FASTOPT_INLINE_LAMBDA {
    own_body(LanesAt<Form>{i, lanes, uint32_t(i) * kWeylStep, weyl_offsets});
  };
  static_assert(kPrefetchBlock % kWidth == 0, "a block is whole vectors");
  int64_t i = begin;
  for (; i + kPrefetchBlock <= end; i += kPrefetchBlock) {
    (prefetch_block_ahead(streams, i), ...);
    for (int64_t v = 0; v < kPrefetchBlock; v += kWidth) lanes_from(i + v, Form::kAll);
  }
  for (; i + kWidth <= end; i += kWidth) lanes_from(i, Form::kAll);
  if constexpr (Form::kMasksLastVector) {
    if (i < end) lanes_from(i, Form::first(end - i));
  } else {
    for (; i < end; ++i) own_body(ElementAt{i, uint32_t(i) * kWeylStep});
  }
}

}  // namespace fastopt::cpu::lanes

namespace fastopt::cpu {

// The loop of each form, compiled for its instruction set (and left out of line by the compiler).
template <typename Body, typename... Streams>
FASTOPT_AVX512_INLINE void prefetched_lanes_loop_avx512(int64_t begin, int64_t end,
                                                        const Body& body,
                                                        const Streams*... streams) {
  lanes::lanes_loop<lanes::Avx512Lanes>(begin, end, body, streams...);
}

template <typename Body, typename... Streams>
FASTOPT_AVX2_INLINE void prefetched_lanes_loop_avx2(int64_t begin, int64_t end, const Body& body,
                                                    const Streams*... streams) {
  lanes::lanes_loop<lanes::Avx2Lanes>(begin, end, body, streams...);
}

}  // namespace fastopt::cpu

#endif  // __x86_64__
