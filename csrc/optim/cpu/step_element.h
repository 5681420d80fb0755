// One element of the optimizer step as the step loops' element body sees it
// (optim/cpu/multi_tensor_step.h): the scalar loop's every element, and the last few of the
// AVX2 lanes loop (optim/cpu/step_lanes.h).
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "optim/step_storage.h"

namespace fastopt::cpu {

// One element, index i, as the scalar loop's element body sees it (LanesAt in
// optim/cpu/step_lanes.h is 8 or 16 of them).
struct ElementAt {
  int64_t i;
  uint32_t weyl;  // the element's Weyl term (step_storage.h)

  template <typename C>
  using Value = C;

  template <typename C, typename T>
  FASTOPT_INLINE C load(const T* stream) const {
    return C(stream[i]);
  }

  template <typename T, typename C>
  FASTOPT_INLINE void store(T* stream, C x) const {
    stream[i] = T(x);
  }

  template <typename St>
  FASTOPT_INLINE typename St::Compute load_param(const typename St::Param* param,
                                                 const MasterElement<St>* master) const {
    MasterElement<St> master_value{};
    if constexpr (St::kMaster != MasterKind::kNone) master_value = master[i];
    return fastopt::load_param<St>(param[i], master_value);
  }

  template <typename St>
  FASTOPT_INLINE void store_param(typename St::Compute p, typename St::Param* param,
                                  MasterElement<St>* master) const {
    MasterElement<St> master_value{};
    fastopt::store_param<St>(p, param[i], master_value);
    if constexpr (St::kMaster != MasterKind::kNone) master[i] = master_value;
  }

  template <typename St>
  FASTOPT_INLINE void store_state(typename St::State* stream, typename St::Compute x,
                                  const uint32_t* keys, int slot) const {
    const uint32_t random = St::kStochastic ? rounding_bits_at_weyl(keys, slot, weyl) : 0;
    stream[i] = fastopt::store_state<St>(x, random);
  }
};

}  // namespace fastopt::cpu
