// Run-time choice of the instruction set the CPU kernels use.
//
// The hot loops are compiled once per instruction set in the same binary (no -march=native), and
// every call picks the widest one this CPU supports. FASTOPT_CPU_ISA (baseline | avx2 | avx512)
// caps the choice, and tests switch it to check every compiled variant against the reference.
#pragma once

#include <string>

namespace fastopt::cpu {

enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest instruction set this CPU runs.
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

// Target attributes of the per-instruction-set variants. Functions that are always inlined into
// such a variant are compiled for its instruction set.
#define FASTOPT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FASTOPT_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

// Defines `static void name(const Args&)`, which calls name##_avx512, name##_avx2 or
// name##_baseline (defined before it) by the active instruction set.
#define FASTOPT_ISA_SWITCH(name, Args)      \
  static void name(const Args& args) {      \
    switch (::fastopt::cpu::active_isa()) { \
      case ::fastopt::cpu::Isa::kAvx512:    \
        return name##_avx512(args);         \
      case ::fastopt::cpu::Isa::kAvx2:      \
        return name##_avx2(args);           \
      default:                              \
        return name##_baseline(args);       \
    }                                       \
  }

// Defines `static void name(const Args&)`, which runs `body(args)` compiled for the active
// instruction set. `body` must be always-inline so that each variant gets its own vector code.
#define FASTOPT_DISPATCH_BY_ISA(name, body, Args)                     \
  FASTOPT_TARGET_AVX512 static void name##_avx512(const Args& args) { \
    body(args);                                                       \
  }                                                                   \
  FASTOPT_TARGET_AVX2 static void name##_avx2(const Args& args) {     \
    body(args);                                                       \
  }                                                                   \
  static void name##_baseline(const Args& args) {                     \
    body(args);                                                       \
  }                                                                   \
  FASTOPT_ISA_SWITCH(name, Args)

#else  // other CPUs (aarch64, ...) get the baseline variant, vectorized for their own baseline

#define FASTOPT_DISPATCH_BY_ISA(name, body, Args) \
  static void name(const Args& args) {            \
    body(args);                                   \
  }

#endif
