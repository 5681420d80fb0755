"""Every launch configuration (block sizes, warps, pipeline stages) fastopt's Triton launchers can
choose, and the rules that choose them: the one place both the launchers and the tests that compile
each configuration for sm_80 and sm_90 read (tests/gpu/test_triton_compile.py).

A configuration must lower for both targets, fit the SM's shared memory (163 KiB per block on
sm_80, 227 KiB on sm_90) and not spill registers; the test checks each one, so a rule here may
only pick from the tables here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Config(NamedTuple):
    """The meta-parameters of one kernel launch."""

    blocks: tuple[tuple[str, int], ...]  # the kernel's constexpr block sizes, by name
    num_warps: int
    num_stages: int

    def launch_options(self) -> dict[str, int]:
        """The keyword arguments of the launch: block sizes, num_warps, num_stages."""
        return {**dict(self.blocks), "num_warps": self.num_warps, "num_stages": self.num_stages}


# How tl.dot multiplies, which sets the registers a tile needs: "16-bit" (fp16 / bf16 tensor-core
# products), "tf32" (fp32 on TF32 tensor cores) or "ieee" (fp32 by FMA, the most registers).
DOT_KINDS = ("16-bit", "tf32", "ieee")


def dot_kind(dtype: torch.dtype) -> str:
    """The dot kind of an operand dtype, by torch's TF32 setting for fp32 matmuls."""
    if dtype != torch.float32:
        return "16-bit"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _smallest_holding(rows: int, sizes: tuple[int, ...]) -> int:
    """The smallest of `sizes` (ascending) that holds `rows`, the largest for more rows."""
    return next((s for s in sizes if rows <= s), sizes[-1])


# --- Block-sparse products (fastopt/triton/blocksparse.py) ---

BLOCKSPARSE_BLOCKS = (16, 32, 64, 128)
BLOCKSPARSE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Dense x block-sparse (forward, grad_input): the tiles of rows per program (tl.dot needs 16 at
# least), up to a largest one and with the warps that a block and dot kind need to hold the
# accumulator and operands in registers without spilling (checked by the compile test).
DSD_ROW_TILES = (16, 32, 64)
_DSD_LIMITS = {  # (dot kind, block): (largest row tile, num_warps)
    **{("16-bit", b): (64, 4) for b in BLOCKSPARSE_BLOCKS},
    **{("tf32", b): (64, 4) for b in (16, 32, 64)},
    ("tf32", 128): (64, 8),
    **{("ieee", b): (64, 4) for b in (16, 32)},
    ("ieee", 64): (64, 8),
    ("ieee", 128): (16, 8),  # the FMA product of a 32 x 128 tile already spills on sm_80
}


def dsd(block: int, kind: str, rows: int) -> Config:
    """The configuration of ``_dsd_kernel`` (forward and grad_input) for `rows` input rows."""
    largest, warps = _DSD_LIMITS[kind, block]
    tile = _smallest_holding(rows, tuple(t for t in DSD_ROW_TILES if t <= largest))
    return Config((("BLOCK_M", tile),), num_warps=warps, num_stages=3)


# grad_values: the rows (the batch) summed per step, likewise bounded per block and dot kind.
SDD_ROW_STEPS = (32, 64)
_SDD_LIMITS = {  # (dot kind, block): (largest row step, num_warps)
    **{("16-bit", b): (64, 4) for b in BLOCKSPARSE_BLOCKS},
    **{("tf32", b): (64, 4) for b in (16, 32)},
    ("tf32", 64): (32, 8),  # 32 rows with 4 warps spill 4 bytes on sm_80
    ("tf32", 128): (64, 8),
    **{("ieee", b): (64, 4) for b in (16, 32)},
    ("ieee", 64): (32, 4),
    ("ieee", 128): (32, 8),
}


def sdd(block: int, kind: str, rows: int) -> Config:
    """The configuration of ``_sdd_kernel`` (grad_values) for a batch of `rows` rows."""
    largest, warps = _SDD_LIMITS[kind, block]
    steps = tuple(s for s in SDD_ROW_STEPS if s <= largest)
    return Config((("BLOCK_K", _smallest_holding(rows, steps)),), warps, num_stages=3)


# --- int8 (fastopt/triton/int8_linear.py) ---

INT8_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _tiles(m: int, n: int, k: int, warps: int) -> Config:
    return Config((("BLOCK_M", m), ("BLOCK_N", n), ("BLOCK_K", k)), warps, num_stages=3)


# (most rows, configuration): small-M tiles for decode-like batches, large ones where the product
# is compute-bound; the last takes any number of rows.
INT8_GEMM_TILES = (
    (16, _tiles(16, 64, 128, 4)),
    (64, _tiles(64, 128, 64, 8)),
    (None, _tiles(128, 128, 32, 8)),  # K steps of 64 spill on sm_80 and sm_90
)
# The weight-only kernel multiplies in fp32 by FMA (see its docstring), which needs more registers
# per output than the int8 tensor-core product: shorter K steps, and an fp32 input (twice the
# bytes per loaded element) smaller tiles still.
WEIGHT_ONLY_TILES = {
    torch.float16: (
        (16, _tiles(16, 64, 128, 4)),
        (64, _tiles(64, 128, 32, 8)),
        (None, _tiles(128, 128, 32, 8)),
    ),
    torch.float32: ((None, _tiles(64, 64, 32, 8)),),
}
WEIGHT_ONLY_TILES[torch.bfloat16] = WEIGHT_ONLY_TILES[torch.float16]


def _by_rows(table, rows: int) -> Config:
    return next(config for most, config in table if most is None or rows <= most)


def int8_gemm(rows: int) -> Config:
    """The configuration of ``_int8_gemm_kernel`` for `rows` rows."""
    return _by_rows(INT8_GEMM_TILES, rows)


def weight_only(dtype: torch.dtype, rows: int) -> Config:
    """The configuration of ``_weight_only_kernel`` for `rows` rows of `dtype`."""
    return _by_rows(WEIGHT_ONLY_TILES[dtype], rows)


# The row quantization reads a row in steps of this many features at most.
QUANTIZE_STEPS = (128, 1024)


def quantize_rows(features: int) -> Config:
    """The configuration of ``_quantize_rows_kernel`` for rows of `features` features."""
    return Config((("BLOCK_K", _smallest_holding(features, QUANTIZE_STEPS)),), 4, num_stages=3)
