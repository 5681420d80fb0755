// Eight float lanes in one AVX2 register: cpu/vec512.h's lane type at half the width, with the
// same operations (each its scalar form's IEEE operation, lane by lane), for the AVX2 level's
// hand-vectorized step loop (optim/cpu/step_lanes.h). AVX2 has no mask registers: a comparison
// gives a vector with every bit of a lane set where it holds, and `where` blends by it.
//
// Compiled for the AVX2 level's features (cpu/isa.h: AVX2, FMA, F16C) and inline rather than
// always-inline for the reason cpu/vec512.h gives.
#pragma once

#if defined(__x86_64__)

#include <immintrin.h>

#include "common/macros.h"
#include "cpu/isa.h"

namespace fastopt::cpu::lanes {

constexpr int kLanes8 = 8;

// The result of a comparison: all bits of a lane set where it holds, none where not.
struct LaneMask8 {
  __m256 bits;
};

struct FloatLanes8 {
  __m256 v;
};

FASTOPT_AVX2_INLINE FloatLanes8 broadcast8(float x) {
  return {_mm256_set1_ps(x)};
}

FASTOPT_AVX2_INLINE FloatLanes8 operator+(FloatLanes8 a, FloatLanes8 b) {
  return {_mm256_add_ps(a.v, b.v)};
}
FASTOPT_AVX2_INLINE FloatLanes8 operator-(FloatLanes8 a, FloatLanes8 b) {
  return {_mm256_sub_ps(a.v, b.v)};
}
FASTOPT_AVX2_INLINE FloatLanes8 operator*(FloatLanes8 a, FloatLanes8 b) {
  return {_mm256_mul_ps(a.v, b.v)};
}
FASTOPT_AVX2_INLINE FloatLanes8 operator/(FloatLanes8 a, FloatLanes8 b) {
  return {_mm256_div_ps(a.v, b.v)};
}

// With a scalar operand (a coefficient), broadcast to every lane: the forms the rules use.
FASTOPT_AVX2_INLINE FloatLanes8 operator+(FloatLanes8 a, float b) {
  return a + broadcast8(b);
}
FASTOPT_AVX2_INLINE FloatLanes8 operator*(FloatLanes8 a, float b) {
  return a * broadcast8(b);
}
FASTOPT_AVX2_INLINE FloatLanes8 operator*(float a, FloatLanes8 b) {
  return broadcast8(a) * b;
}
FASTOPT_AVX2_INLINE FloatLanes8 operator/(FloatLanes8 a, float b) {
  return a / broadcast8(b);
}

// Comparisons as C++'s on floats: false where either lane is NaN, except for !=.
FASTOPT_AVX2_INLINE LaneMask8 operator>(FloatLanes8 a, FloatLanes8 b) {
  return {_mm256_cmp_ps(a.v, b.v, _CMP_GT_OQ)};
}
FASTOPT_AVX2_INLINE LaneMask8 operator!=(FloatLanes8 a, FloatLanes8 b) {
  return {_mm256_cmp_ps(a.v, b.v, _CMP_NEQ_UQ)};
}
FASTOPT_AVX2_INLINE LaneMask8 operator|(LaneMask8 a, LaneMask8 b) {
  return {_mm256_or_ps(a.bits, b.bits)};
}

// Lane by lane, condition ? a : b (the vector form of step_math.h's `where`).
FASTOPT_AVX2_INLINE FloatLanes8 where(LaneMask8 condition, FloatLanes8 a, FloatLanes8 b) {
  return {_mm256_blendv_ps(b.v, a.v, condition.bits)};
}

FASTOPT_AVX2_INLINE FloatLanes8 sqrt(FloatLanes8 a) {
  return {_mm256_sqrt_ps(a.v)};
}

}  // namespace fastopt::cpu::lanes

#endif  // __x86_64__
