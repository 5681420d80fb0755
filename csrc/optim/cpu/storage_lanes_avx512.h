// The storage of optim/step_storage.h, 16 elements at a time, for the hand-vectorized AVX-512
// step loop (optim/cpu/step_lanes.h). The low-precision steps are bound by vector
// instructions rather than by memory on the CPU, and the compiler's vectorization of the scalar
// conversions takes more of them than these: here a bfloat16 is widened, and a rounded float
// packed back to 16 bits, by one permutation each (instead of a widening and a shift, or a shift
// and a narrowing), and a NaN's fixed result is merged into the rounding's addition by its mask.
// Every store gives the scalar conversion's bits (c10's for bfloat16 and Half, the storage
// header's for stochastic rounding and the remainder form): tests/optim/step_lanes_bits.cpp
// checks them on every upper half of a float's bits.
//
// Compiled for AVX-512 only (cpu/vec512.h).
#pragma once

#if defined(__x86_64__)

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#include "cpu/vec512.h"
#include "optim/step_storage.h"

namespace fastopt::cpu::lanes {

// -- 16-bit lanes ------------------------------------------------------------------------------

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
// -Wmaybe-uninitialized too (cpu/vec512.h). (A 512-bit store masked to its lower half would do
// without it, but the masked-off upper half then blocks store-to-load forwarding for the next 16
// elements.)
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
// and keeping the upper half; NaN becomes kBf16QuietNan.
FASTOPT_AVX512_INLINE void store_lanes(c10::BFloat16* p, FloatLanes x, LaneMask lanes) {
  const __m512i bits = lane_bits(x);
  const __m512i bias =
      _mm512_add_epi32(_mm512_and_si512(shift_right(bits, 16), splat(1)), splat(0x7fff));
  const __m512i rounded =
      _mm512_mask_add_epi32(splat(uint32_t(kBf16QuietNan) << 16), ordered_lanes(x), bits, bias);
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
  x = _mm512_mullo_epi32(x, splat(kMix32Multiplier1));
  x = _mm512_xor_si512(x, shift_right(x, 15));
  x = _mm512_mullo_epi32(x, splat(kMix32Multiplier2));
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
  const __m512i rounded = _mm512_mask_add_epi32(splat(uint32_t(kBf16QuietNan) << 16),
                                                ordered_lanes(x), lane_bits(x), random);
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
  const __m512i rounded = _mm512_mask_add_epi32(
      _mm512_or_si512(bits, splat(uint32_t(kBf16QuietNan) << 16)), ordered, bits, splat(0x8000));
  // The remainder in the lower half: the master less the param's value (0 for NaN).
  const __m512i difference =
      _mm512_maskz_sub_epi32(ordered, bits, _mm512_and_si512(rounded, splat(0xffff0000u)));
  store_word_halves<1>(param, rounded, lanes);
  store_word_halves<0>(remainder, difference, lanes);
}

// The 16-lane form of the hand-vectorized step loop (optim/cpu/step_lanes.h): its types, and
// the last vector masked to the elements left.
struct Avx512Lanes {
  using Float = FloatLanes;
  using Mask = LaneMask;
  using Bits = __m512i;
  static constexpr int kWidth = kLanes;
  static constexpr bool kMasksLastVector = true;
  static constexpr LaneMask kAll{kAllLanes};
  static FASTOPT_AVX512_INLINE LaneMask first(int64_t count) {
    return {__mmask16((1u << count) - 1)};
  }
  static FASTOPT_AVX512_INLINE __m512i weyl_offsets() { return lane_weyl_offsets(); }
};

}  // namespace fastopt::cpu::lanes

#endif  // __x86_64__
