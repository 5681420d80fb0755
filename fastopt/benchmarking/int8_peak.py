"""The references the int8 benchmarks quote beside their GOP/s: the instruction set's int8 peak
at the clock the kernel reports (a VM may report its nominal clock, below the turbo one it
runs at), and a probe, fastopt's own int8_mm on a shape whose operands stay in the L2 caches (a
reference point, not a bound: layers with a shorter K or a wider N can pass it)."""

from __future__ import annotations

import torch

from .. import _extension
from ..functional import int8 as int8_ops
from .timing import median_ms

# Multiply-adds per cycle per core of each int8 GEMM variant: an AMX tdpbusd (16 x 16 x 64 byte
# products) issues once per 16 cycles; vpdpbusd does 64 on each of 2 ports; AVX2's vpmaddwd 16
# on each of 2; the portable loop about one.
_MACS_PER_CYCLE = {"amx": 1024, "vnni": 128, "avx2": 32, "portable": 1}


def cpu_clock_ghz() -> float:
    """The core clock the kernel reports (/proc/cpuinfo's "cpu MHz"; a VM often reports the
    nominal clock, below the turbo one), or 0.0 where it reports none."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return 0.0


def int8_peak_gops(threads: int | None = None) -> float:
    """2 * MACs per cycle * cores * GHz of the int8 GEMM variant the active instruction set runs,
    at `cpu_clock_ghz` (0.0 where the clock is unknown)."""
    variant = _extension.cpu_module().int8_kernels()
    threads = threads or torch.get_num_threads()
    return 2 * _MACS_PER_CYCLE[variant] * threads * cpu_clock_ghz()


@torch.inference_mode()
def int8_gemm_probe_gops(rows: int = 512, k: int = 4096, n: int = 256) -> float:
    """GOP/s of fastopt.functional.int8_mm on a [rows, k] x [k, n] product whose operands (2 MiB
    input, 1 MiB weight) stay in the L2 caches and whose int32 output is small beside its
    products (k / 2 operations per output byte)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    packed, compensation = int8_ops.pack_int8_weight(w)
    ms = median_ms(lambda: int8_ops.int8_mm(a, packed, compensation, k), "cpu", repeats=20)
    return 2 * rows * k * n / ms / 1e6


def ceiling_line() -> str:
    """One line: the int8 GEMM variant, its peak at the reported clock, and the probe."""
    variant = _extension.cpu_module().int8_kernels()
    return (
        f"int8 ceilings ({variant} kernels, {torch.get_num_threads()} threads): peak "
        f"{int8_peak_gops():.0f} GOP/s at the reported {cpu_clock_ghz():.2f} GHz; in-cache "
        f"int8_mm probe {int8_gemm_probe_gops():.0f} GOP/s"
    )
