"""The CPU instruction sets fastopt's kernels can be run under on this machine."""

from __future__ import annotations

from fastopt import _extension

_ISA_ORDER = ("baseline", "avx2", "avx512")


def supported_cpu_isas() -> list[str]:
    """Every instruction set fastopt's CPU kernels can use on this CPU, narrowest first."""
    best = _extension.cpu_module().best_cpu_isa()
    return list(_ISA_ORDER[: _ISA_ORDER.index(best) + 1])
