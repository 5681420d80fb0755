#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace fastopt::cpu {
namespace {

bool cpu_supports(Isa isa) {
#if defined(__x86_64__)
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case Isa::kBaseline:
      return true;
  }
  return false;
#else
  return isa == Isa::kBaseline;  // the only variant compiled for other CPUs (isa.h)
#endif
}

Isa initial_isa() {
  const char* requested = std::getenv("FASTOPT_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return best_supported_isa();
  const Isa isa = parse_isa(requested);
  TORCH_CHECK(cpu_supports(isa), "FASTOPT_CPU_ISA=", requested,
              " asks for an instruction set this CPU lacks; the widest it supports is ",
              isa_name(best_supported_isa()));
  return isa;
}

std::atomic<Isa>& active() {
  static std::atomic<Isa> isa{initial_isa()};
  return isa;
}

}  // namespace

Isa best_supported_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (cpu_supports(isa)) return isa;
  }
  return Isa::kBaseline;
}

Isa active_isa() {
  return active().load(std::memory_order_relaxed);
}

void set_active_isa(Isa isa) {
  TORCH_CHECK(cpu_supports(isa), "this CPU cannot run ", isa_name(isa),
              " kernels; the widest it supports is ", isa_name(best_supported_isa()));
  active().store(isa, std::memory_order_relaxed);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return "avx512";
    case Isa::kAvx2:
      return "avx2";
    case Isa::kBaseline:
      return "baseline";
  }
  return "unknown";
}

Isa parse_isa(const std::string& name) {
  for (Isa isa : {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512}) {
    if (name == isa_name(isa)) return isa;
  }
  TORCH_CHECK(false, "unknown CPU instruction set '", name,
              "'; expected one of: baseline, avx2, avx512");
}

}  // namespace fastopt::cpu
