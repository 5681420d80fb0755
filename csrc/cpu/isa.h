// Run-time choice of the instruction set the CPU kernels use.
//
// The hot loops are compiled once per instruction set in the same binary (no -march=native), and
// every call picks the variant of the active level. The levels are ordered, each including the
// ones before it: baseline < avx2 < avx512 < avx512_vnni < amx. The float kernels have one
// variant per vector width (baseline, avx2, avx512: the two highest levels run the avx512 one);
// the int8 GEMM has one per level (portable, AVX2, AVX2 again on AVX-512 without VNNI, VNNI, AMX).
// The active level starts at the widest this CPU supports; FASTOPT_CPU_ISA (or set_active_isa,
// which tests use to check every variant against the reference) caps it, for every kernel.
#pragma once

#include <string>

namespace fastopt::cpu {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Vnni = 3, kAmx = 4 };

// The widest instruction set this CPU (and, for AMX, the operating system) lets fastopt run.
Isa best_supported_isa();
// The one the kernels use now.
Isa active_isa();
// Makes the kernels use `isa`; throws if this CPU cannot run it.
void set_active_isa(Isa isa);

const char* isa_name(Isa isa);
// Throws, listing the valid names, for an unknown one.
Isa parse_isa(const std::string& name);

}  // namespace fastopt::cpu

#if defined(__x86_64__)

// The target features of each level, each extending the one before (string literals concatenate).
#define FASTOPT_FEATURES_AVX2 "avx2,fma,f16c"
#define FASTOPT_FEATURES_AVX512 "avx512f,avx512bw,avx512vl,avx512dq," FASTOPT_FEATURES_AVX2
#define FASTOPT_FEATURES_AVX512_VNNI "avx512vnni," FASTOPT_FEATURES_AVX512
#define FASTOPT_FEATURES_AMX "amx-tile,amx-int8," FASTOPT_FEATURES_AVX512_VNNI

// Target attributes of the per-instruction-set variants. Functions that are always inlined into
// such a variant are compiled for its instruction set.
#define FASTOPT_TARGET_AVX2 __attribute__((target(FASTOPT_FEATURES_AVX2)))
#define FASTOPT_TARGET_AVX512 __attribute__((target(FASTOPT_FEATURES_AVX512)))
#define FASTOPT_TARGET_AVX512_VNNI __attribute__((target(FASTOPT_FEATURES_AVX512_VNNI)))
#define FASTOPT_TARGET_AMX __attribute__((target(FASTOPT_FEATURES_AMX)))

// A function compiled for AVX-512 that its callers may inline without being compiled for it
// themselves (where an always-inline one could not be: cpu/vec512.h says when that matters), and
// the same for AVX2.
#define FASTOPT_AVX512_INLINE inline FASTOPT_TARGET_AVX512
#define FASTOPT_AVX2_INLINE inline FASTOPT_TARGET_AVX2

// The one dispatch of the vector kernels. Defines `static void name(const Args& args)`, which runs
// `avx512_call`, `avx2_call` or `baseline_call` (statements reading `args`), each compiled for its
// instruction set, by the vector width of the active level.
#define FASTOPT_DISPATCH_BY_VECTOR_WIDTH(name, Args, avx512_call, avx2_call, baseline_call) \
  FASTOPT_TARGET_AVX512 static void name##_avx512(const Args& args) {                       \
    avx512_call;                                                                            \
  }                                                                                         \
  FASTOPT_TARGET_AVX2 static void name##_avx2(const Args& args) {                           \
    avx2_call;                                                                              \
  }                                                                                         \
  static void name##_baseline(const Args& args) {                                           \
    baseline_call;                                                                          \
  }                                                                                         \
  static void name(const Args& args) {                                                      \
    const ::fastopt::cpu::Isa isa = ::fastopt::cpu::active_isa();                           \
    if (isa >= ::fastopt::cpu::Isa::kAvx512) return name##_avx512(args);                    \
    if (isa >= ::fastopt::cpu::Isa::kAvx2) return name##_avx2(args);                        \
    return name##_baseline(args);                                                           \
  }

#else  // other CPUs (aarch64, ...) get the baseline variant, vectorized for their own baseline

#define FASTOPT_DISPATCH_BY_VECTOR_WIDTH(name, Args, avx512_call, avx2_call, baseline_call) \
  static void name(const Args& args) {                                                      \
    baseline_call;                                                                          \
  }

#endif

// Defines `static void name(const Args&)`, which runs `body(args)` compiled for the active
// instruction set. `body` must be always-inline so that each variant gets its own vector code.
#define FASTOPT_DISPATCH_BY_ISA(name, body, Args) \
  FASTOPT_DISPATCH_BY_VECTOR_WIDTH(name, Args, body(args), body(args), body(args))
