"""The int8 GEMM (`fastopt.functional.int8_mm`) bit-exact against an int64 reference matmul, on
every CPU instruction set variant, and the packed weight layout it reads."""

from __future__ import annotations

import pytest
import torch
from helpers.rng import generator

from fastopt.functional import int8

SIZES = [1, 3, 16, 17, 512]  # rows: one, a few, a full tile pair, one past it, many tiles
# (K, N): even / odd, below and above a group / block. Where the CPU has AMX, whole 16-row tiles
# run on it for K = 64 and 128 (whole 64-byte steps) and K = 67 (one step, then a VNNI tail).
FEATURES = [(64, 48), (128, 16), (67, 33), (5, 130)]


def reference_mm(a, w):
    return a.long() @ w.long().T


@pytest.mark.parametrize("rows", SIZES)
@pytest.mark.parametrize(("k", "n"), FEATURES)
def test_int8_mm_is_exact(cpu_isa, rows, k, n):
    gen = generator(rows * 1000 + k * 10 + n)
    a = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    out = int8.int8_mm(a, *int8.pack_int8_weight(w), w.shape[1])
    assert out.dtype == torch.int32 and out.shape == (rows, n)
    assert torch.equal(out.long(), reference_mm(a, w))


@pytest.mark.parametrize(
    ("a_value", "w_value"), [(127, 127), (-127, 127), (-127, -127), (-128, -127)]
)
@pytest.mark.parametrize(
    ("rows", "k"), [(9, 4099), (33, 4096), (33, 4099)], ids=["vector", "amx+rows", "amx+rows+tail"]
)
def test_int8_mm_extremes_do_not_saturate(cpu_isa, a_value, w_value, rows, k):
    """Every product at the int8 limits: an int16 pairwise sum (vpmaddubsw) would saturate at
    32767, and the +128 offset of the VNNI / AMX paths must still cancel exactly. Where the CPU
    has AMX, 33 rows are two AMX tiles and one row on the vector kernel; K = 4099 adds a K tail
    on the vector kernel to the AMX sums."""
    n = 35
    a = torch.full((rows, k), a_value, dtype=torch.int8)
    w = torch.full((n, k), w_value, dtype=torch.int8)
    out = int8.int8_mm(a, *int8.pack_int8_weight(w), w.shape[1])
    assert torch.equal(out.long(), torch.full((rows, n), a_value * w_value * k))


def test_int8_mm_alternating_signs(cpu_isa):
    """Products of both signs next to each other in a group, where a pairwise int16 sum of
    unsigned * signed bytes would clip."""
    k, n = 256, 17
    signs = torch.tensor([1, -1], dtype=torch.int8).repeat(k // 2)
    a = torch.stack([signs * 127, -signs * 127, torch.full((k,), 127, dtype=torch.int8)])
    w = torch.stack([signs * 127] * n)
    out = int8.int8_mm(a, *int8.pack_int8_weight(w), w.shape[1])
    assert torch.equal(out.long(), reference_mm(a, w))


def test_int8_mm_non_contiguous_input(cpu_isa):
    gen = generator(7)
    a = torch.randint(-128, 128, (40, 33), dtype=torch.int8, generator=gen).T  # [33, 40]
    w = torch.randint(-127, 128, (18, 40), dtype=torch.int8, generator=gen)
    out = int8.int8_mm(a, *int8.pack_int8_weight(w), 40)
    assert torch.equal(out.long(), reference_mm(a, w))


def test_int8_mm_empty():
    w = torch.ones(5, 8, dtype=torch.int8)
    out = int8.int8_mm(torch.empty(0, 8, dtype=torch.int8), *int8.pack_int8_weight(w), 8)
    assert out.shape == (0, 5) and out.dtype == torch.int32


@pytest.mark.parametrize(("n", "k"), [(1, 1), (16, 4), (33, 67)])
def test_pack_round_trip_and_layout(n, k):
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator(n + k))
    packed, compensation = int8.pack_int8_weight(w)
    assert packed.shape == (-(-n // 16), -(-k // 4), 16, 4) and packed.is_contiguous()
    assert torch.equal(int8.unpack_int8_weight(packed, n, k), w)
    # Channel j, input i sits at block j // 16, group i // 4, lane j % 16, byte i % 4.
    j, i = n - 1, k - 1
    assert packed[j // 16, i // 4, j % 16, i % 4] == w[j, i]
    assert torch.equal(compensation, w.sum(dim=1, dtype=torch.int32) * 128)


def test_quantize_per_channel():
    w = torch.randn(9, 13, generator=generator(3), dtype=torch.float64)
    w[4] = 0
    q, scale = int8.quantize_per_channel(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert q.abs().amax(dim=1).tolist() == [127] * 4 + [0] + [127] * 4
    assert scale[4] == 1
    assert (
        (q.double() * scale.double()[:, None] - w).abs() <= scale.double()[:, None] / 2 + 1e-7
    ).all()


@pytest.mark.parametrize("n", [5, 16, 40], ids=["part-block", "one-block", "last-panel-1-block"])
@pytest.mark.parametrize("rows", [16, 32, 35])
def test_int8_mm_one_block_panel_with_k_tail(cpu_isa, rows, n):
    """Panels of one 16-column block whose rows run on AMX with a K tail on the vector kernel:
    the tail's sums cover only that block's columns, and only those are added (the other half of
    the tail buffer is never written)."""
    gen = generator(int(torch.randint(0, 2**31, ())))
    k = 64 * 3 + 7
    a = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    out = int8.int8_mm(a, *int8.pack_int8_weight(w), k)
    assert torch.equal(out.long(), reference_mm(a, w))
