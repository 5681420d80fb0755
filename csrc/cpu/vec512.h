// Sixteen float lanes in one AVX-512 register, with the arithmetic the optimizer rules use
// (optim/*_rule.h), so that a rule written once for one scalar element also runs on 16 elements
// in the hand-vectorized CPU loop (optim/cpu/step_lanes.h). Each operation is its scalar
// form's IEEE operation, lane by lane. As in the compiler-vectorized loops, GCC may fuse a
// multiplication and an addition into one multiply-add (the build allows contraction), and where
// it fuses differently the results differ in the last bit: the two loops agree to rounding.
//
// Everything here is compiled for AVX-512: call it only from code compiled for AVX-512 (an
// AVX-512 variant of cpu/isa.h, or a function always inlined into one). These functions are
// `inline` rather than always-inline: GCC refuses to always-inline a function of a wider target
// into code of the default target, such as a rule's update, before that code is itself inlined
// into the AVX-512 variant; as plain inline functions they are inlined there at -O3
// (tests/optim/test_step_lanes.py checks that the extension keeps none of them out of line).
#pragma once

#if defined(__x86_64__)

#include <immintrin.h>

#include "common/macros.h"
#include "cpu/isa.h"

namespace fastopt::cpu::lanes {

constexpr int kLanes = 16;
constexpr __mmask16 kAllLanes = 0xffff;

// The plain forms of some AVX-512 intrinsics pass an undefined source, which GCC 12 reports under
// -Wall as maybe used uninitialized (GCC bug 105593). Their zero-masked forms with kAllLanes are
// the same instruction, so the lane code uses those (maskz_sqrt, maskz_srli, ...).

// A lane mask: the result of a comparison, or which lanes of a vector are in use.
struct LaneMask {
  __mmask16 bits;
};

struct FloatLanes {
  __m512 v;
};

FASTOPT_AVX512_INLINE FloatLanes broadcast(float x) {
  return {_mm512_set1_ps(x)};
}

FASTOPT_AVX512_INLINE FloatLanes operator+(FloatLanes a, FloatLanes b) {
  return {_mm512_add_ps(a.v, b.v)};
}
FASTOPT_AVX512_INLINE FloatLanes operator-(FloatLanes a, FloatLanes b) {
  return {_mm512_sub_ps(a.v, b.v)};
}
FASTOPT_AVX512_INLINE FloatLanes operator*(FloatLanes a, FloatLanes b) {
  return {_mm512_mul_ps(a.v, b.v)};
}
FASTOPT_AVX512_INLINE FloatLanes operator/(FloatLanes a, FloatLanes b) {
  return {_mm512_div_ps(a.v, b.v)};
}

// With a scalar operand (a coefficient), broadcast to every lane: the forms the rules use.
FASTOPT_AVX512_INLINE FloatLanes operator+(FloatLanes a, float b) {
  return a + broadcast(b);
}
FASTOPT_AVX512_INLINE FloatLanes operator*(FloatLanes a, float b) {
  return a * broadcast(b);
}
FASTOPT_AVX512_INLINE FloatLanes operator*(float a, FloatLanes b) {
  return broadcast(a) * b;
}
FASTOPT_AVX512_INLINE FloatLanes operator/(FloatLanes a, float b) {
  return a / broadcast(b);
}

// Comparisons as C++'s on floats: false where either lane is NaN, except for !=.
FASTOPT_AVX512_INLINE LaneMask operator>(FloatLanes a, FloatLanes b) {
  return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ)};
}
FASTOPT_AVX512_INLINE LaneMask operator!=(FloatLanes a, FloatLanes b) {
  return {_mm512_cmp_ps_mask(a.v, b.v, _CMP_NEQ_UQ)};
}
FASTOPT_AVX512_INLINE LaneMask operator|(LaneMask a, LaneMask b) {
  return {__mmask16(a.bits | b.bits)};
}

// Lane by lane, condition ? a : b (the vector form of step_math.h's `where`).
FASTOPT_AVX512_INLINE FloatLanes where(LaneMask condition, FloatLanes a, FloatLanes b) {
  return {_mm512_mask_blend_ps(condition.bits, b.v, a.v)};
}

FASTOPT_AVX512_INLINE FloatLanes sqrt(FloatLanes a) {
  return {_mm512_maskz_sqrt_ps(kAllLanes, a.v)};
}

}  // namespace fastopt::cpu::lanes

#endif  // __x86_64__
