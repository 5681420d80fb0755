// The storage of optim/step_storage.h, 8 elements at a time, for the AVX2 level's hand-vectorized
// step loop (optim/cpu/step_lanes.h): storage_lanes_avx512.h at half the width, with the AVX2
// level's instructions (cpu/isa.h: AVX2, FMA, F16C). GCC does not vectorize the scalar loop of
// any layout with 16-bit storage at this level (the branches of the rules and of the conversions
// are not if-converted for AVX2), so these steps would otherwise run one element at a time.
//
// AVX2 has no masked 16-bit loads or stores: the loop runs whole vectors only (the last few
// elements take the scalar code), so these forms take no lane mask, only WholeLanes8 where the
// 16-lane forms take one, to keep the loop's calls the same. Every store gives the scalar
// conversion's bits, as the 16-lane ones do (tests/optim/step_lanes_bits.cpp checks both).
#pragma once

#if defined(__x86_64__)

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "cpu/vec256.h"
#include "optim/step_storage.h"

namespace fastopt::cpu::lanes {

// All 8 lanes: the only lanes the AVX2 loop loads or stores.
struct WholeLanes8 {};

// -- 16-bit lanes ------------------------------------------------------------------------------

FASTOPT_AVX2_INLINE __m256i splat8(uint32_t x) {
  return _mm256_set1_epi32(int(x));
}

// 8 words widened into the upper halves of the 32-bit lanes (the lower halves zero): a bfloat16
// widened to float, or a remainder form's param part.
FASTOPT_AVX2_INLINE __m256i load_words_to_upper_halves(const void* p, WholeLanes8) {
  const __m128i words = _mm_loadu_si128(static_cast<const __m128i*>(p));
  return _mm256_slli_epi32(_mm256_cvtepu16_epi32(words), 16);
}

// Stores the upper (HALF 1) or lower (HALF 0) halves of the 32-bit lanes as 8 words: gathered
// into the low 64 bits of each 128-bit half, then those two joined.
template <int HALF>
FASTOPT_AVX2_INLINE void store_word_halves(void* p, __m256i values, WholeLanes8) {
  const __m256i index = _mm256_setr_epi8(
      2 * HALF, 2 * HALF + 1, 4 + 2 * HALF, 5 + 2 * HALF, 8 + 2 * HALF, 9 + 2 * HALF, 12 + 2 * HALF,
      13 + 2 * HALF, -1, -1, -1, -1, -1, -1, -1, -1,  //
      2 * HALF, 2 * HALF + 1, 4 + 2 * HALF, 5 + 2 * HALF, 8 + 2 * HALF, 9 + 2 * HALF, 12 + 2 * HALF,
      13 + 2 * HALF, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(values, index), 0b1000);
  _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}

FASTOPT_AVX2_INLINE __m256i lane_bits(FloatLanes8 x) {
  return _mm256_castps_si256(x.v);
}

// All bits set in the lanes that are not NaN.
FASTOPT_AVX2_INLINE __m256i ordered_lanes(FloatLanes8 x) {
  return _mm256_castps_si256(_mm256_cmp_ps(x.v, x.v, _CMP_ORD_Q));
}

// Lane by lane, the lanes of `ordered` (all bits set or none) ? a : b.
FASTOPT_AVX2_INLINE __m256i select(__m256i ordered, __m256i a, __m256i b) {
  return _mm256_blendv_epi8(b, a, ordered);
}

// -- loads, widened exactly to float -------------------------------------------------------------

FASTOPT_AVX2_INLINE FloatLanes8 load_lanes(const float* p, WholeLanes8) {
  return {_mm256_loadu_ps(p)};
}

FASTOPT_AVX2_INLINE FloatLanes8 load_lanes(const c10::BFloat16* p, WholeLanes8 lanes) {
  return {_mm256_castsi256_ps(load_words_to_upper_halves(p, lanes))};
}

FASTOPT_AVX2_INLINE FloatLanes8 load_lanes(const c10::Half* p, WholeLanes8) {
  return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))};
}

// -- stores, rounded to nearest ----------------------------------------------------------------

FASTOPT_AVX2_INLINE void store_lanes(float* p, FloatLanes8 x, WholeLanes8) {
  _mm256_storeu_ps(p, x.v);
}

// As c10::BFloat16(float): to nearest, ties to even, by adding 0x7fff plus the lowest kept bit
// and keeping the upper half; NaN becomes kBf16QuietNan.
FASTOPT_AVX2_INLINE void store_lanes(c10::BFloat16* p, FloatLanes8 x, WholeLanes8 lanes) {
  const __m256i bits = lane_bits(x);
  const __m256i bias =
      _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(bits, 16), splat8(1)), splat8(0x7fff));
  const __m256i rounded =
      select(ordered_lanes(x), _mm256_add_epi32(bits, bias), splat8(uint32_t(kBf16QuietNan) << 16));
  store_word_halves<1>(p, rounded, lanes);
}

// As c10::Half(float): the instruction rounds to nearest even as c10 does, and c10 turns every
// NaN into its sign with 0x7e00 where the instruction would keep the payload's upper bits.
FASTOPT_AVX2_INLINE void store_lanes(c10::Half* p, FloatLanes8 x, WholeLanes8) {
  const __m128i half = _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m128i nan =
      _mm_or_si128(_mm_and_si128(half, _mm_set1_epi16(short(0x8000))), _mm_set1_epi16(0x7e00));
  // The 32-bit lanes' masks narrowed to 16 bits (all ones or zeros, so saturation keeps them).
  const __m256i ordered = ordered_lanes(x);
  const __m128i ordered_words =
      _mm_packs_epi32(_mm256_castsi256_si128(ordered), _mm256_extracti128_si256(ordered, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm_blendv_epi8(nan, half, ordered_words));
}

// -- stochastic rounding (step_storage.h) --------------------------------------------------------

FASTOPT_AVX2_INLINE __m256i mix32_lanes(__m256i x) {
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, splat8(kMix32Multiplier1));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
  x = _mm256_mullo_epi32(x, splat8(kMix32Multiplier2));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
}

// The Weyl terms (step_storage.h) of lanes 0 to 7 relative to lane 0: lane * kWeylStep.
FASTOPT_AVX2_INLINE __m256i lane_weyl_offsets8() {
  return _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), splat8(kWeylStep));
}

// rounding_bits_at_weyl for 8 elements, lane 0's Weyl term being `weyl`.
FASTOPT_AVX2_INLINE __m256i rounding_bits_lanes(const uint32_t* keys, int slot, uint32_t weyl,
                                                __m256i weyl_offsets) {
  const __m256i stream_bits =
      mix32_lanes(_mm256_add_epi32(splat8(keys[slot / 2] + weyl), weyl_offsets));
  return slot % 2 == 0 ? _mm256_and_si256(stream_bits, splat8(0xffff))
                       : _mm256_srli_epi32(stream_bits, 16);
}

// As bf16_round_stochastic.
FASTOPT_AVX2_INLINE void store_lanes_stochastic(c10::BFloat16* p, FloatLanes8 x, __m256i random,
                                                WholeLanes8 lanes) {
  const __m256i rounded = select(ordered_lanes(x), _mm256_add_epi32(lane_bits(x), random),
                                 splat8(uint32_t(kBf16QuietNan) << 16));
  store_word_halves<1>(p, rounded, lanes);
}

// -- the bfloat16 remainder form (step_storage.h: split_master, join_master) --------------------

FASTOPT_AVX2_INLINE FloatLanes8 load_lanes_joined(const c10::BFloat16* param,
                                                  const int16_t* remainder, WholeLanes8 lanes) {
  const __m256i upper = load_words_to_upper_halves(param, lanes);
  const __m256i low =
      _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(remainder)));
  return {_mm256_castsi256_ps(_mm256_add_epi32(upper, low))};
}

FASTOPT_AVX2_INLINE void store_lanes_split(c10::BFloat16* param, int16_t* remainder,
                                           FloatLanes8 master, WholeLanes8 lanes) {
  const __m256i bits = lane_bits(master);
  const __m256i ordered = ordered_lanes(master);
  // The param in the upper half: the master rounded to nearest, ties away from zero; for NaN, the
  // master's upper half made quiet.
  const __m256i rounded = select(ordered, _mm256_add_epi32(bits, splat8(0x8000)),
                                 _mm256_or_si256(bits, splat8(uint32_t(kBf16QuietNan) << 16)));
  // The remainder in the lower half: the master less the param's value (0 for NaN).
  const __m256i difference = _mm256_and_si256(
      ordered, _mm256_sub_epi32(bits, _mm256_and_si256(rounded, splat8(0xffff0000u))));
  store_word_halves<1>(param, rounded, lanes);
  store_word_halves<0>(remainder, difference, lanes);
}

// The 8-lane form of the hand-vectorized step loop (optim/cpu/step_lanes.h): its types, and
// whole vectors only.
struct Avx2Lanes {
  using Float = FloatLanes8;
  using Mask = WholeLanes8;
  using Bits = __m256i;
  static constexpr int kWidth = kLanes8;
  static constexpr bool kMasksLastVector = false;
  static constexpr WholeLanes8 kAll{};
  static FASTOPT_AVX2_INLINE __m256i weyl_offsets() { return lane_weyl_offsets8(); }
};

}  // namespace fastopt::cpu::lanes

#endif  // __x86_64__
