// How a param, its master copy and its optimizer state are stored, and how values move between
// that storage and the compute type of the update, on the CPU and CUDA alike.
//
// A param of dtype S is updated in the compute type C (float, or double for float64 params).
// Around that sit two choices, made per param:
//   - a master copy: the update reads and writes a float32 master, and the 16-bit param gets the
//     master rounded to nearest in the same pass. For bfloat16 params the master may instead be
//     kept as a 16-bit remainder: the param holds the master's upper half (rounded to nearest,
//     ties away from zero) and the remainder the signed difference, so that the two together give
//     the float32 master back exactly, at 2 bytes per param instead of 4;
//   - the state dtype T: the param's own, float32 (16-bit params) or bfloat16; bfloat16 state may
//     be rounded stochastically on store, with random bits that are a pure function of (seed,
//     step, state slot, element index), so CPU and CUDA runs and resumed checkpoints agree.
// Each supported combination is one StorageLayout code; kernels are instantiated per code.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/macros.h"

namespace fastopt {

enum class MasterKind : uint8_t { kNone, kFloat, kBf16Remainder };

// The storage types of one param: S its dtype, T its state's, M its master kind, and whether
// bfloat16 state is rounded stochastically.
template <typename S, typename T, MasterKind M, bool STOCHASTIC>
struct Storage {
  using Param = S;
  using State = T;
  using Compute = std::conditional_t<std::is_same_v<S, double>, double, float>;
  static constexpr MasterKind kMaster = M;
  static constexpr bool kStochastic = STOCHASTIC;
  // Whether the update must round as torch.optim's step does: float32 and float64 params with
  // state of their own dtype and no master copy, whose results match torch's to rounding. Every
  // other layout stores its param or its state in 16 bits, far coarser than the last bit of a
  // float32 update, so there a rule may replace a correctly rounded operation by a cheaper one.
  static constexpr bool kTorchRounding =
      std::is_same_v<S, Compute> && std::is_same_v<T, S> && M == MasterKind::kNone;
};

// Every supported storage combination: X(code name, S, T, master kind, stochastic).
#define FASTOPT_STORAGE_LAYOUTS(X)                                                \
  X(kDouble, double, double, kNone, false)                                        \
  X(kFloat, float, float, kNone, false)                                           \
  X(kFloatBf16State, float, c10::BFloat16, kNone, false)                          \
  X(kFloatBf16StateStochastic, float, c10::BFloat16, kNone, true)                 \
  X(kHalf, c10::Half, c10::Half, kNone, false)                                    \
  X(kHalfFloatState, c10::Half, float, kNone, false)                              \
  X(kHalfMaster, c10::Half, float, kFloat, false)                                 \
  X(kHalfMasterBf16State, c10::Half, c10::BFloat16, kFloat, false)                \
  X(kHalfMasterBf16StateStochastic, c10::Half, c10::BFloat16, kFloat, true)       \
  X(kBf16, c10::BFloat16, c10::BFloat16, kNone, false)                            \
  X(kBf16Stochastic, c10::BFloat16, c10::BFloat16, kNone, true)                   \
  X(kBf16FloatState, c10::BFloat16, float, kNone, false)                          \
  X(kBf16Master, c10::BFloat16, float, kFloat, false)                             \
  X(kBf16MasterBf16State, c10::BFloat16, c10::BFloat16, kFloat, false)            \
  X(kBf16MasterBf16StateStochastic, c10::BFloat16, c10::BFloat16, kFloat, true)   \
  X(kBf16Remainder, c10::BFloat16, float, kBf16Remainder, false)                  \
  X(kBf16RemainderBf16State, c10::BFloat16, c10::BFloat16, kBf16Remainder, false) \
  X(kBf16RemainderBf16StateStochastic, c10::BFloat16, c10::BFloat16, kBf16Remainder, true)

enum class StorageLayout : uint8_t {
#define FASTOPT_LAYOUT_CODE(code, S, T, M, STOCHASTIC) code,
  FASTOPT_STORAGE_LAYOUTS(FASTOPT_LAYOUT_CODE)
#undef FASTOPT_LAYOUT_CODE
      kUnsupported
};

// Calls Loop::template run<Storage<...>>(args) for the layout `code` (one of the supported ones;
// the drivers check before they dispatch).
template <typename Loop, typename Args>
FASTOPT_HOST_DEVICE FASTOPT_INLINE void switch_storage(StorageLayout code, const Args& args) {
  switch (code) {
#define FASTOPT_LAYOUT_CASE(code, S, T, M, STOCHASTIC) \
  case StorageLayout::code:                            \
    return Loop::template run<Storage<S, T, MasterKind::M, STOCHASTIC>>(args);
    FASTOPT_STORAGE_LAYOUTS(FASTOPT_LAYOUT_CASE)
#undef FASTOPT_LAYOUT_CASE
    default:
      return;
  }
}

// -- bit-level helpers ------------------------------------------------------------------------

FASTOPT_HOST_DEVICE FASTOPT_INLINE uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
#endif
}

FASTOPT_HOST_DEVICE FASTOPT_INLINE float bits_float(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

// A 32-bit integer hash with good avalanche (every input bit flips each output bit with
// probability about 1/2): two multiply-xorshift rounds, with these multipliers.
constexpr uint32_t kMix32Multiplier1 = 0x21f0aaadu;
constexpr uint32_t kMix32Multiplier2 = 0x735a2d97u;

FASTOPT_HOST_DEVICE FASTOPT_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= kMix32Multiplier1;
  x ^= x >> 15;
  x *= kMix32Multiplier2;
  x ^= x >> 15;
  return x;
}

// Stochastic rounding draws 16 random bits per stored element and state slot. Two slots share
// one 32-bit stream of random bits (slot 2k takes the low half of stream k, slot 2k + 1 the high
// half), which halves the hashing, the costliest part of a stochastically rounded step.
FASTOPT_HOST_DEVICE FASTOPT_INLINE constexpr int rounding_streams(int state_slots) {
  return (state_slots + 1) / 2;
}

// The key of one random stream at one step: every (seed, step, stream) gets its own.
FASTOPT_HOST_DEVICE FASTOPT_INLINE uint32_t rounding_key(uint32_t seed, uint32_t step, int stream) {
  return mix32(seed ^ mix32(step * 8u + uint32_t(stream) + 0x9e3779b9u));
}

// The step of the Weyl sequence the random streams hash: element `index` of a stream hashes its
// key plus index * kWeylStep (mod 2^32).
constexpr uint32_t kWeylStep = 0x9e3779b9u;

// The 16 random bits (in the low half) of state slot `slot` of the element whose Weyl term is
// `weyl` (index * kWeylStep), from stream slot / 2, whose key is keys[slot / 2]. Taking the Weyl
// term lets a loop add it up rather than multiply for every element.
FASTOPT_HOST_DEVICE FASTOPT_INLINE uint32_t rounding_bits_at_weyl(const uint32_t* keys, int slot,
                                                                  uint32_t weyl) {
  const uint32_t stream_bits = mix32(keys[slot / 2] + weyl);
  return (slot % 2 == 0 ? stream_bits : stream_bits >> 16) & 0xffffu;
}

// The same for element `index`. The index is taken modulo 2^32: a 32-bit index vectorizes
// better, and only its low bits matter to the hash's quality.
FASTOPT_HOST_DEVICE FASTOPT_INLINE uint32_t rounding_bits(const uint32_t* keys, int slot,
                                                          uint32_t index) {
  return rounding_bits_at_weyl(keys, slot, index * kWeylStep);
}

// -- stores -----------------------------------------------------------------------------------

// The bits of bfloat16's quiet NaN, which a float NaN becomes when rounded to nearest (c10) or
// stochastically.
constexpr uint16_t kBf16QuietNan = 0x7fc0u;

// v rounded to bfloat16 up or down, up with probability (v - down) / (up - down): adding 16
// random bits (`random` < 2^16) below the kept ones and truncating. Unbiased: the expected stored
// value is v. Infinities stay infinite (their low bits are zero, so the sum never carries); NaN
// becomes bfloat16's quiet NaN, as round-to-nearest makes it, rather than a carry out of its
// payload.
FASTOPT_HOST_DEVICE FASTOPT_INLINE c10::BFloat16 bf16_round_stochastic(float v, uint32_t random) {
  // NaN tested as a float comparison (one vector instruction) rather than on the bits.
  const bool is_nan = v != v;
  const uint16_t rounded = is_nan ? kBf16QuietNan : uint16_t((float_bits(v) + random) >> 16);
  return c10::BFloat16(rounded, c10::BFloat16::from_bits());
}

// A state value stored as T: rounded to nearest, or stochastically with `random`.
template <typename St, typename C>
FASTOPT_HOST_DEVICE FASTOPT_INLINE typename St::State store_state(C v, uint32_t random) {
  if constexpr (St::kStochastic) {
    return bf16_round_stochastic(float(v), random);
  } else {
    return typename St::State(v);
  }
}

// The bfloat16 remainder form of a float32 master: the param's bits (the master rounded to
// nearest, ties away from zero) and the signed difference to the master's bits, in
// [-0x8000, 0x7fff]. Exact for every non-NaN master, infinities included; a NaN master gives a
// NaN param (and reads back as NaN).
struct Bf16WithRemainder {
  uint16_t param_bits;
  int16_t remainder;
};

FASTOPT_HOST_DEVICE FASTOPT_INLINE Bf16WithRemainder split_master(float master) {
  const uint32_t bits = float_bits(master);
  if (master != master) return {uint16_t(kBf16QuietNan | (bits >> 16)), 0};  // NaN
  // No overflow: the largest non-NaN bit pattern is -inf, 0xff800000.
  const uint32_t upper = (bits + 0x8000u) >> 16;
  return {uint16_t(upper), int16_t(int32_t(bits - (upper << 16)))};
}

FASTOPT_HOST_DEVICE FASTOPT_INLINE float join_master(uint16_t param_bits, int16_t remainder) {
  return bits_float((uint32_t(param_bits) << 16) + uint32_t(int32_t(remainder)));
}

// -- params and their master copies -----------------------------------------------------------

// The C++ type of a master copy's elements (of any type where there is none).
template <typename St>
using MasterElement = std::conditional_t<St::kMaster == MasterKind::kBf16Remainder, int16_t, float>;

// The value the update starts from: the master copy where there is one, else the param.
template <typename St>
FASTOPT_HOST_DEVICE FASTOPT_INLINE typename St::Compute load_param(typename St::Param param,
                                                                   MasterElement<St> master) {
  if constexpr (St::kMaster == MasterKind::kFloat) {
    return master;
  } else if constexpr (St::kMaster == MasterKind::kBf16Remainder) {
    return join_master(param.x, master);
  } else {
    return typename St::Compute(param);
  }
}

// Stores the updated value `p`: into the master copy and, rounded, the param.
template <typename St>
FASTOPT_HOST_DEVICE FASTOPT_INLINE void store_param(typename St::Compute p,
                                                    typename St::Param& param,
                                                    MasterElement<St>& master) {
  if constexpr (St::kMaster == MasterKind::kBf16Remainder) {
    const Bf16WithRemainder split = split_master(p);
    param = c10::BFloat16(split.param_bits, c10::BFloat16::from_bits());
    master = split.remainder;
  } else {
    if constexpr (St::kMaster == MasterKind::kFloat) master = p;
    param = typename St::Param(p);
  }
}

}  // namespace fastopt
