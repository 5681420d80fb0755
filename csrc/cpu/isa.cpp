#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

#if defined(__x86_64__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastopt::cpu {
namespace {

// Every level, from the narrowest.
constexpr Isa kLevels[] = {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512, Isa::kAvx512Vnni, Isa::kAmx};

#if defined(__x86_64__)
// Whether this CPU has AMX-INT8 and Linux lets this process use the tile registers (asked once;
// the request is what grants the permission).
bool amx_usable() {
  static const bool usable = [] {
    unsigned eax, ebx, ecx, edx;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = edx & (1u << 24), int8 = edx & (1u << 25);
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;  // from asm/prctl.h
    return tile && int8 && syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return usable;
}
#endif

bool cpu_supports(Isa isa) {
#if defined(__x86_64__)
  switch (isa) {
    case Isa::kAmx:
      return cpu_supports(Isa::kAvx512Vnni) && amx_usable();
    case Isa::kAvx512Vnni:
      return cpu_supports(Isa::kAvx512) && __builtin_cpu_supports("avx512vnni");
    case Isa::kAvx512:
      return cpu_supports(Isa::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
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
  Isa best = Isa::kBaseline;
  for (Isa isa : kLevels) {
    if (!cpu_supports(isa)) break;
    best = isa;
  }
  return best;
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
    case Isa::kAmx:
      return "amx";
    case Isa::kAvx512Vnni:
      return "avx512_vnni";
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
  for (Isa isa : kLevels) {
    if (name == isa_name(isa)) return isa;
  }
  TORCH_CHECK(false, "unknown CPU instruction set '", name,
              "'; expected one of: baseline, avx2, avx512, avx512_vnni, amx");
}

}  // namespace fastopt::cpu
