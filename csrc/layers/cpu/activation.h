// The activations a CPU layer kernel can apply in its epilogue, on the fp32 output value before
// the cast to the output dtype: `fastopt.int8_linear(..., activation=...)`. The names are the
// schema's (fastopt/_library.py, INT8_ACTIVATIONS).
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include "common/macros.h"

namespace fastopt::cpu {

enum class Activation { kNone, kGelu };

inline Activation activation_from_name(const char* op, c10::string_view name) {
  if (name == "none") return Activation::kNone;
  if (name == "gelu") return Activation::kGelu;
  TORCH_CHECK(false, op, ": activation must be 'none' or 'gelu', got '", std::string(name), "'");
}

// erf(x) in fp32 as a rational function of x (Eigen's and XLA's fast float erf: odd numerator
// of degree 13 over even denominator of degree 8, on x clamped to [-4, 4], beyond which erf is
// +-1 in fp32); absolute error below 5e-7. Branch-free and without exp, so that a loop over it
// vectorizes. The polynomials are evaluated with fused multiply-adds, spelled out: one
// instruction each where the instruction set has FMA (the epilogue's files turn contraction
// off), a correctly rounded library call where not, so every level gives the same bits.
FASTOPT_INLINE float erf_rational(float x) {
  x = x < -4.0f ? -4.0f : x;
  x = x > 4.0f ? 4.0f : x;
  const float x2 = x * x;
  float p = __builtin_fmaf(x2, -2.72614225801306e-10f, 2.77068142495902e-08f);
  p = __builtin_fmaf(x2, p, -2.10102402082508e-06f);
  p = __builtin_fmaf(x2, p, -5.69250639462346e-05f);
  p = __builtin_fmaf(x2, p, -7.34990630326855e-04f);
  p = __builtin_fmaf(x2, p, -2.95459980854025e-03f);
  p = __builtin_fmaf(x2, p, -1.60960333262415e-02f);
  float q = __builtin_fmaf(x2, -1.45660718464996e-05f, -2.13374055278905e-04f);
  q = __builtin_fmaf(x2, q, -1.68282697438203e-03f);
  q = __builtin_fmaf(x2, q, -7.37332916720468e-03f);
  q = __builtin_fmaf(x2, q, -1.42647390514189e-02f);
  return x * p / q;
}

// torch.nn.functional.gelu(x) (approximate="none"): x / 2 * (1 + erf(x / sqrt(2))); its absolute
// error stays within that of torch's own fp32 kernel (about 1e-6 at |x| = 5).
FASTOPT_INLINE float gelu(float x) {
  return 0.5f * x * (1.0f + erf_rational(x * 0.70710678118654752f));
}

template <Activation A>
FASTOPT_INLINE float activate(float x) {
  if constexpr (A == Activation::kGelu) return gelu(x);
  return x;
}

}  // namespace fastopt::cpu
