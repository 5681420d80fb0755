// Sixteen elements at a time: how the hand-vectorized AVX-512 step loop reads and writes the
// storage of optim/step_storage.h. The low-precision steps are bound by vector instructions
// rather than by memory on the CPU, and the compiler's vectorization of the scalar conversions
// takes more of them than these: here a bfloat16 is widened, and a rounded float packed back to
// 16 bits, by one permutation each (instead of a widening and a shift, or a shift and a
// narrowing), and a NaN's fixed result is merged into the rounding's addition by its mask.
// Every store gives the scalar conversion's bits (c10's for bfloat16 and Half, the storage
// header's for stochastic rounding and the remainder form): tests/optim/step_lanes_bits.cpp
// checks them on every upper half of a float's bits.
//
// Compiled for AVX-512 only (cpu/vec512.h); used by optim/cpu/multi_tensor_step.h.
#pragma once

#if defined(__x86_64__)

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "cpu/vec512.h"
#include "optim/cpu/prefetched_loop.h"
#include "optim/step_storage.h"

namespace fastopt::cpu::lanes {

// -- 16-bit lanes ------------------------------------------------------------------------------

// Every lane. The plain forms of some intrinsics take an undefined source that GCC 12 reports as
// maybe uninitialized under -Wall (GCC bug 105593); their zero-masked forms with every lane set
// compile to the same instruction, so this file uses those.
constexpr __mmask16 kAllLanes = 0xffff;

FASTOPT_AVX512_INLINE __m512i splat(uint32_t x) {
  return _mm512_set1_epi32(int(x));
}

FASTOPT_AVX512_INLINE __m512i shift_right(__m512i x, unsigned bits) {
  return _mm512_maskz_srli_epi32(kAllLanes, x, bits);
}

// The word indexes that pick the upper (HALF 1) or lower (HALF 0) 16-bit half of each 32-bit lane
// into the lower 256 bits, and that spread 16 words back to the upper halves of the lanes.
template <int HALF>
FASTOPT_AVX512_INLINE __m512i word_halves_index() {
  return _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16,  //
                          30 + HALF, 28 + HALF, 26 + HALF, 24 + HALF, 22 + HALF, 20 + HALF,
                          18 + HALF, 16 + HALF, 14 + HALF, 12 + HALF, 10 + HALF, 8 + HALF, 6 + HALF,
                          4 + HALF, 2 + HALF, HALF);
}

FASTOPT_AVX512_INLINE __m512i words_to_upper_halves_index() {
  return _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0,  //
                          7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
}

// 16 words loaded into the upper halves of the 32-bit lanes (the lower halves zero): a bfloat16
// widened to float, or a remainder's upper part. One permutation instead of a widening and a
// shift.
FASTOPT_AVX512_INLINE __m512i load_words_to_upper_halves(const void* p, LaneMask lanes) {
  const __m512i words = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(lanes.bits, p));
  return _mm512_maskz_permutexvar_epi16(0xaaaaaaaau, words_to_upper_halves_index(), words);
}

// As _mm512_castsi512_si256 (a register's lower half; no instruction), whose GCC 12 form trips
// -Wmaybe-uninitialized too. (A 512-bit store masked to its lower half would do without it, but
// the masked-off upper half then blocks store-to-load forwarding for the next 16 elements.)
FASTOPT_AVX512_INLINE __m256i lower_256_bits(__m512i x) {
  __m256i lower;
  std::memcpy(&lower, &x, sizeof lower);
  return lower;
}

// Stores the upper (HALF 1) or lower (HALF 0) halves of the 32-bit lanes as 16 words.
template <int HALF>
FASTOPT_AVX512_INLINE void store_word_halves(void* p, __m512i values, LaneMask lanes) {
  const __m512i packed = _mm512_permutexvar_epi16(word_halves_index<HALF>(), values);
  _mm256_mask_storeu_epi16(p, lanes.bits, lower_256_bits(packed));
}

FASTOPT_AVX512_INLINE __m512i lane_bits(FloatLanes x) {
  return _mm512_castps_si512(x.v);
}

FASTOPT_AVX512_INLINE __mmask16 ordered_lanes(FloatLanes x) {
  return _mm512_cmp_ps_mask(x.v, x.v, _CMP_ORD_Q);
}

// -- loads: the lanes in `lanes` (the others read as 0), widened exactly to float ---------------

FASTOPT_AVX512_INLINE FloatLanes load_lanes(const float* p, LaneMask lanes) {
  return {_mm512_maskz_loadu_ps(lanes.bits, p)};
}

FASTOPT_AVX512_INLINE FloatLanes load_lanes(const c10::BFloat16* p, LaneMask lanes) {
  return {_mm512_castsi512_ps(load_words_to_upper_halves(p, lanes))};
}

FASTOPT_AVX512_INLINE FloatLanes load_lanes(const c10::Half* p, LaneMask lanes) {
  return {_mm512_maskz_cvtph_ps(kAllLanes, _mm256_maskz_loadu_epi16(lanes.bits, p))};
}

// -- stores, rounded to nearest ----------------------------------------------------------------

FASTOPT_AVX512_INLINE void store_lanes(float* p, FloatLanes x, LaneMask lanes) {
  _mm512_mask_storeu_ps(p, lanes.bits, x.v);
}

// As c10::BFloat16(float): to nearest, ties to even, by adding 0x7fff plus the lowest kept bit
// and keeping the upper half; NaN becomes 0x7fc0.
FASTOPT_AVX512_INLINE void store_lanes(c10::BFloat16* p, FloatLanes x, LaneMask lanes) {
  const __m512i bits = lane_bits(x);
  const __m512i bias =
      _mm512_add_epi32(_mm512_and_si512(shift_right(bits, 16), splat(1)), splat(0x7fff));
  const __m512i rounded = _mm512_mask_add_epi32(splat(0x7fc00000u), ordered_lanes(x), bits, bias);
  store_word_halves<1>(p, rounded, lanes);
}

// As c10::Half(float): the instruction rounds to nearest even as c10 does, and c10 turns every
// NaN into its sign with 0x7e00 where the instruction would keep the payload's upper bits.
FASTOPT_AVX512_INLINE void store_lanes(c10::Half* p, FloatLanes x, LaneMask lanes) {
  const __m256i half =
      _mm512_maskz_cvtps_ph(kAllLanes, x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i nan = _mm256_or_si256(_mm256_and_si256(half, _mm256_set1_epi16(short(0x8000))),
                                      _mm256_set1_epi16(0x7e00));
  const __mmask16 nan_lanes = __mmask16(~ordered_lanes(x));
  _mm256_mask_storeu_epi16(p, lanes.bits, _mm256_mask_mov_epi16(half, nan_lanes, nan));
}

// -- stochastic rounding (step_storage.h) --------------------------------------------------------

FASTOPT_AVX512_INLINE __m512i mix32_lanes(__m512i x) {
  x = _mm512_xor_si512(x, shift_right(x, 16));
  x = _mm512_mullo_epi32(x, splat(0x21f0aaadu));
  x = _mm512_xor_si512(x, shift_right(x, 15));
  x = _mm512_mullo_epi32(x, splat(0x735a2d97u));
  return _mm512_xor_si512(x, shift_right(x, 15));
}

// The Weyl terms (step_storage.h) of lanes 0 to 15 relative to lane 0: lane * kWeylStep.
FASTOPT_AVX512_INLINE __m512i lane_weyl_offsets() {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            splat(kWeylStep));
}

// rounding_bits_at_weyl for 16 elements, lane 0's Weyl term being `weyl`.
FASTOPT_AVX512_INLINE __m512i rounding_bits_lanes(const uint32_t* keys, int slot, uint32_t weyl,
                                                  __m512i weyl_offsets) {
  const __m512i stream_bits =
      mix32_lanes(_mm512_add_epi32(splat(keys[slot / 2] + weyl), weyl_offsets));
  return slot % 2 == 0 ? _mm512_and_si512(stream_bits, splat(0xffff))
                       : shift_right(stream_bits, 16);
}

// As bf16_round_stochastic.
FASTOPT_AVX512_INLINE void store_lanes_stochastic(c10::BFloat16* p, FloatLanes x, __m512i random,
                                                  LaneMask lanes) {
  const __m512i rounded =
      _mm512_mask_add_epi32(splat(0x7fc00000u), ordered_lanes(x), lane_bits(x), random);
  store_word_halves<1>(p, rounded, lanes);
}

// -- the bfloat16 remainder form (step_storage.h: split_master, join_master) --------------------

FASTOPT_AVX512_INLINE FloatLanes load_lanes_joined(const c10::BFloat16* param,
                                                   const int16_t* remainder, LaneMask lanes) {
  const __m512i upper = load_words_to_upper_halves(param, lanes);
  const __m512i low =
      _mm512_maskz_cvtepi16_epi32(kAllLanes, _mm256_maskz_loadu_epi16(lanes.bits, remainder));
  return {_mm512_castsi512_ps(_mm512_add_epi32(upper, low))};
}

FASTOPT_AVX512_INLINE void store_lanes_split(c10::BFloat16* param, int16_t* remainder,
                                             FloatLanes master, LaneMask lanes) {
  const __m512i bits = lane_bits(master);
  const __mmask16 ordered = ordered_lanes(master);
  // The param in the upper half: the master rounded to nearest, ties away from zero; for NaN, the
  // master's upper half made quiet.
  const __m512i rounded = _mm512_mask_add_epi32(_mm512_or_si512(bits, splat(0x7fc00000u)), ordered,
                                                bits, splat(0x8000));
  // The remainder in the lower half: the master less the param's value (0 for NaN).
  const __m512i difference =
      _mm512_maskz_sub_epi32(ordered, bits, _mm512_and_si512(rounded, splat(0xffff0000u)));
  store_word_halves<1>(param, rounded, lanes);
  store_word_halves<0>(remainder, difference, lanes);
}

// -- one step's elements ------------------------------------------------------------------------

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
  constexpr LaneMask kAll{0xffff};
  int64_t i = begin;
  for (; i + kPrefetchBlock <= end; i += kPrefetchBlock) {
    (prefetch_block_ahead(streams, i), ...);
    for (int64_t v = 0; v < kPrefetchBlock; v += 16) lanes_from(i + v, kAll);
  }
  for (; i + 16 <= end; i += 16) lanes_from(i, kAll);
  if (i < end) lanes_from(i, LaneMask{__mmask16((1u << (end - i)) - 1)});
}

}  // namespace fastopt::cpu

#endif  // __x86_64__
