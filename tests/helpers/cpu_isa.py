"""The CPU instruction set levels fastopt's kernels can be run under on this machine."""

from __future__ import annotations

from fastopt import _extension

# Narrowest first, each level including the ones before (csrc/cpu/isa.h).
ISA_LEVELS = ("baseline", "avx2", "avx512", "avx512_vnni", "amx")


def supported_cpu_isas() -> list[str]:
    """Every instruction set level fastopt's CPU kernels can use on this CPU, narrowest first."""
    best = _extension.cpu_module().best_cpu_isa()
    return list(ISA_LEVELS[: ISA_LEVELS.index(best) + 1])
