// The bit-level parts of the hand-vectorized step loops (csrc/optim/cpu/step_lanes.h), in both
// forms (16 lanes on AVX-512, 8 on AVX2, each where the CPU has it), against their scalar forms
// (csrc/optim/step_storage.h, c10's conversions), exactly: widening loads, stores rounded to
// nearest, stochastic rounding and its random bits, and the bfloat16 remainder form, with masked
// lanes where the form has masks, under the default and the flush-to-zero floating-point modes. The
// arithmetic between them is the rules' own code (test_step_lanes.py checks whole steps). Built and
// run by test_step_lanes.py; prints the number of mismatches and exits non-zero if there is one.
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "optim/cpu/storage_lanes_avx2.h"
#include "optim/cpu/storage_lanes_avx512.h"

namespace {

using c10::BFloat16;
using c10::Half;
using fastopt::cpu::lanes::Avx2Lanes;
using fastopt::cpu::lanes::Avx512Lanes;

int mismatches = 0;
const char* form_checked = "";  // the lanes form the checks run on now

void expect_equal(uint32_t got, uint32_t want, const char* what, uint32_t input) {
  if (got == want) return;
  if (++mismatches <= 20) {
    std::printf("%s lanes, %s of 0x%08x: got 0x%08x, want 0x%08x\n", form_checked, what, input, got,
                want);
  }
}

uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

bool is_nan_bits(uint32_t b) {
  return (b & 0x7fffffffu) > 0x7f800000u;
}

// Float bit patterns that reach every case of a conversion: all 2^16 upper halves, each with
// lower halves at and around the rounding points of bfloat16 (below the upper half) and of Half
// (bits 12 and 13 for normal Halves: ties with an even and an odd kept bit), and a random one.
std::vector<uint32_t> float_patterns() {
  std::mt19937 rng(7);
  const uint32_t lows[] = {0x0000, 0x0001, 0x0fff, 0x1000, 0x1001, 0x2fff, 0x3000,
                           0x3001, 0x7fff, 0x8000, 0x8001, 0xf000, 0xffff};
  std::vector<uint32_t> patterns;
  for (uint32_t upper = 0; upper < 0x10000; ++upper) {
    for (uint32_t low : lows) patterns.push_back(upper << 16 | low);
    patterns.push_back(upper << 16 | (rng() & 0xffff));
  }
  while (patterns.size() % 16 != 0) patterns.push_back(rng());
  return patterns;
}

// A mask of some lanes, for the checks that lanes outside it are neither read nor written (the
// forms with masks).
constexpr uint16_t kSomeLanes = 0xb5f3;

// The checks are written once for both forms: always inlined into check_form below, compiled for
// the form's instruction set. Vectors go to and from memory by the form's own float load and
// store.
template <typename Form>
FASTOPT_INLINE void check_loads() {
  constexpr int kWidth = Form::kWidth;
  std::vector<uint16_t> words(0x10000);
  for (uint32_t w = 0; w < 0x10000; ++w) words[w] = uint16_t(w);
  float widened[kWidth];
  for (uint32_t at = 0; at < 0x10000; at += kWidth) {
    store_lanes(widened, load_lanes(reinterpret_cast<const BFloat16*>(&words[at]), Form::kAll),
                Form::kAll);
    for (int j = 0; j < kWidth; ++j) {
      const BFloat16 x(words[at + j], BFloat16::from_bits());
      expect_equal(bits_of(widened[j]), bits_of(float(x)), "bfloat16 load", at + j);
    }
    store_lanes(widened, load_lanes(reinterpret_cast<const Half*>(&words[at]), Form::kAll),
                Form::kAll);
    for (int j = 0; j < kWidth; ++j) {
      const Half x(words[at + j], Half::from_bits());
      uint32_t want = bits_of(float(x));
      // The instruction quiets a signalling NaN, c10 keeps it signalling; the loop only loads
      // values into arithmetic, which quiets them anyway.
      if (is_nan_bits(want)) want |= 0x00400000u;
      expect_equal(bits_of(widened[j]), want, "Half load", at + j);
    }
  }
  if constexpr (Form::kMasksLastVector) {  // lanes outside the mask read as zero
    const typename Form::Mask some{kSomeLanes};
    store_lanes(widened, load_lanes(reinterpret_cast<const BFloat16*>(&words[0x3f80]), some),
                Form::kAll);
    for (int j = 0; j < kWidth; ++j) {
      const bool on = (kSomeLanes >> j) & 1;
      expect_equal(bits_of(widened[j]), on ? uint32_t(0x3f80 + j) << 16 : 0u, "masked load", j);
    }
  }
}

// What the 16-bit stores of one vector of values wrote, each into a buffer filled with 0xee.
struct Stored {
  uint16_t nearest[16], half[16], stochastic[16], split_param[16], split_remainder[16];
};

template <typename Form>
FASTOPT_INLINE Stored store_all(typename Form::Float x, typename Form::Bits random,
                                typename Form::Mask lanes) {
  Stored out;
  std::memset(&out, 0xee, sizeof out);
  store_lanes(reinterpret_cast<BFloat16*>(out.nearest), x, lanes);
  store_lanes(reinterpret_cast<Half*>(out.half), x, lanes);
  store_lanes_stochastic(reinterpret_cast<BFloat16*>(out.stochastic), x, random, lanes);
  store_lanes_split(reinterpret_cast<BFloat16*>(out.split_param),
                    reinterpret_cast<int16_t*>(out.split_remainder), x, lanes);
  return out;
}

template <typename Form>
FASTOPT_INLINE void check_stores(const std::vector<uint32_t>& patterns) {
  constexpr int kWidth = Form::kWidth;
  std::mt19937 rng(11);
  uint32_t keys[2] = {0x12345678u, 0x9abcdef0u};
  const typename Form::Bits weyl_offsets = Form::weyl_offsets();
  for (size_t at = 0; at < patterns.size(); at += kWidth) {
    float values[kWidth];
    std::memcpy(values, &patterns[at], sizeof values);
    const typename Form::Float x = load_lanes(values, Form::kAll);
    const uint32_t weyl = uint32_t(rng());
    const int slot = int(at / kWidth % 2);
    const typename Form::Bits random =
        fastopt::cpu::lanes::rounding_bits_lanes(keys, slot, weyl, weyl_offsets);
    const Stored all = store_all<Form>(x, random, Form::kAll);
    // And back: the param and remainder joined give the master (NaN stays NaN).
    float joined[kWidth];
    store_lanes(
        joined,
        load_lanes_joined(reinterpret_cast<const BFloat16*>(all.split_param),
                          reinterpret_cast<const int16_t*>(all.split_remainder), Form::kAll),
        Form::kAll);
    for (int j = 0; j < kWidth; ++j) {
      const uint32_t in = patterns[at + j];
      expect_equal(all.nearest[j], BFloat16(values[j]).x, "bfloat16 store", in);
      expect_equal(all.half[j], Half(values[j]).x, "Half store", in);
      const uint32_t want_random =
          fastopt::rounding_bits_at_weyl(keys, slot, weyl + uint32_t(j) * fastopt::kWeylStep);
      expect_equal(all.stochastic[j], fastopt::bf16_round_stochastic(values[j], want_random).x,
                   "stochastic store", in);
      const fastopt::Bf16WithRemainder want = fastopt::split_master(values[j]);
      expect_equal(all.split_param[j], want.param_bits, "remainder form's param", in);
      expect_equal(all.split_remainder[j], uint16_t(want.remainder), "remainder", in);
      const float want_joined = fastopt::join_master(want.param_bits, want.remainder);
      expect_equal(bits_of(joined[j]), bits_of(want_joined), "remainder join", in);
    }
    // The stores write their lanes only: beyond the vector (all forms), and under a mask (the
    // forms with masks) the lanes outside it, are untouched.
    for (const uint16_t* written :
         {all.nearest, all.half, all.stochastic, all.split_param, all.split_remainder}) {
      for (int j = kWidth; j < 16; ++j) {
        expect_equal(written[j], 0xeeeeu, "store beyond the vector", patterns[at]);
      }
    }
    if constexpr (Form::kMasksLastVector) {
      if (at % 256 == 0) {
        const Stored some = store_all<Form>(x, random, typename Form::Mask{kSomeLanes});
        const uint16_t* const written[] = {all.nearest, all.half, all.stochastic, all.split_param,
                                           all.split_remainder};
        const uint16_t* const masked[] = {some.nearest, some.half, some.stochastic,
                                          some.split_param, some.split_remainder};
        for (int store = 0; store < 5; ++store) {
          for (int j = 0; j < kWidth; ++j) {
            const bool inside = (kSomeLanes >> j) & 1;
            expect_equal(masked[store][j], inside ? written[store][j] : 0xeeeeu,
                         inside ? "masked store" : "store outside the mask", patterns[at + j]);
          }
        }
      }
    }
  }
}

// Every check of one form under the default and the flush-to-zero floating-point modes.
template <typename Form>
FASTOPT_INLINE void check_form(const std::vector<uint32_t>& patterns) {
  const unsigned default_modes = _mm_getcsr();
  // Default modes, then flush-to-zero and denormals-are-zero (torch.set_flush_denormal(True)).
  for (const unsigned modes : {default_modes, default_modes | 0x8040u}) {
    _mm_setcsr(modes);
    check_loads<Form>();
    check_stores<Form>(patterns);
  }
  _mm_setcsr(default_modes);
}

FASTOPT_TARGET_AVX512 void check_avx512(const std::vector<uint32_t>& patterns) {
  check_form<Avx512Lanes>(patterns);
}

FASTOPT_TARGET_AVX2 void check_avx2(const std::vector<uint32_t>& patterns) {
  check_form<Avx2Lanes>(patterns);
}

}  // namespace

int main() {
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (!avx2) {
    std::printf("no AVX2 on this CPU\n");
    return 2;
  }
  const std::vector<uint32_t> patterns = float_patterns();
  form_checked = "8";
  check_avx2(patterns);
  std::printf("checked the 8 lanes\n");
  if (avx512) {
    form_checked = "16";
    check_avx512(patterns);
    std::printf("checked the 16 lanes\n");
  }
  std::printf("%zu patterns, %d mismatches\n", patterns.size(), mismatches);
  return mismatches == 0 ? 0 : 1;
}
