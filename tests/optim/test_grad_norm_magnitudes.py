"""fastopt::grad_norm on the CPU looks for a block's largest magnitude only when the block's
float32-run sum is small enough for it to be below 2^-50 (csrc/optim/cpu/grad_norm.cpp), and
prefetches each block's lines ahead of its reads. Here: blocks on either side of that bound and at
it (every element at, just above or just below 2^-50; one such element among much smaller ones);
zero, tiny, huge and non-finite blocks read together with ordinary ones; fresh random tensors of
odd sizes over many magnitudes; for every dtype, norm types 2, 1 and inf, on every instruction
set, against torch in float64, and bit-identical whatever the thread count."""

from __future__ import annotations

import pytest
import torch
from helpers.rng import generator
from helpers.threads import at_thread_counts

INF = float("inf")
NAN = float("nan")
BLOCK = 4096  # elements per accumulated block (kNormBlock)
SMALLEST = 2.0**-50  # kFloatRunSmallest: below it, a block is summed again in float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
NORM_TYPES = [2.0, 1.0, INF]


def grad_norm(tensors, norm_type=2.0) -> torch.Tensor:
    return torch.ops.fastopt.grad_norm(tensors, norm_type, None)


def assert_matches_torch(result, tensors, norm_type) -> None:
    """float64 to 1e-12 if any tensor is float64, else float32 to its rounding."""
    fp64 = any(t.dtype == torch.float64 for t in tensors)
    assert result.dtype == (torch.float64 if fp64 else torch.float32)
    flat = torch.cat([t.to(torch.float64).flatten() for t in tensors])
    expected = torch.linalg.vector_norm(flat, norm_type).to(result.dtype)
    rtol = 1e-12 if fp64 else 2e-7
    torch.testing.assert_close(result, expected, rtol=rtol, atol=0, equal_nan=True)


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.view(-1).view(torch.uint8).tolist() == b.view(-1).view(torch.uint8).tolist()


def around_smallest(dtype: torch.dtype) -> dict[str, float]:
    """2^-50 and its neighbours in `dtype` (float32's for float64, which takes no float32 runs
    but must give the same norms)."""
    at = torch.tensor([SMALLEST], dtype=dtype)
    return {
        "below": at.nextafter(torch.tensor([0.0], dtype=dtype)).item(),
        "at": SMALLEST,
        "above": at.nextafter(torch.tensor([1.0], dtype=dtype)).item(),
    }


@pytest.mark.parametrize("side", ["below", "at", "above"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_blocks_of_elements_all_near_the_bound(cpu_isa, dtype, norm_type, side):
    """Every element of 3 whole blocks and a partial one at the magnitude (random signs): their
    sums sit at the bound on the sum (at), just above it or just below it, which decides whether
    the largest magnitude is looked for; either way the norm is torch's."""
    gen = generator(141)
    magnitude = around_smallest(dtype)[side]
    size = 3 * BLOCK + 1000
    signs = torch.randint(0, 2, (size,), generator=gen).to(torch.float64) * 2 - 1
    t = (signs * magnitude).to(dtype)
    assert t.abs().max().item() == magnitude
    assert_matches_torch(grad_norm([t], norm_type), [t], norm_type)


@pytest.mark.parametrize("largest", ["below", "at", "above"])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_element_near_the_bound_among_tiny_ones(cpu_isa, dtype, norm_type, largest):
    """Each block holds values of about 2^-75 (their float32 squares are subnormal, so float32
    runs would lose most of their bits) and one element at 2^-50 or a neighbour of it: its block
    is summed again in float64 exactly when that element is below 2^-50, and the norm is torch's
    either way (above, the subnormal squares are below float32's rounding of the sum)."""
    gen = generator(142)
    size = 5 * BLOCK - 77
    t = torch.rand(size, generator=gen, dtype=torch.float64) * 2.0**-75
    magnitude = around_smallest(dtype)[largest]
    for b in range(0, size, BLOCK):
        t[b + int(torch.randint(0, min(BLOCK, size - b), (1,), generator=gen))] = -magnitude
    t = t.to(dtype)
    result = grad_norm([t], norm_type)
    assert result.item() > 0
    assert_matches_torch(result, [t], norm_type)


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_blocks_alone_are_summed_in_float64(cpu_isa, dtype, norm_type):
    """A tensor whose every magnitude is about 2^-70: in float32 runs its squares would underflow
    to subnormals and lose their bits, so each block must take the float64 sum (a sum far below the
    bound on the sum, so its largest magnitude is looked for)."""
    gen = generator(143)
    t = (torch.randn(2 * BLOCK + 333, generator=gen, dtype=torch.float64) * 2.0**-70).to(dtype)
    assert_matches_torch(grad_norm([t], norm_type), [t], norm_type)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_tiny_huge_and_ordinary_blocks_read_together(cpu_isa, dtype, norm_type):
    """Blocks of one tensor read together (one thread reads four at once), each of another kind:
    zeros, tiny values, huge ones (their float32 squares overflow for float32 and bfloat16),
    ordinary ones; the partial last block ordinary."""
    gen = generator(144)
    finfo = torch.finfo(dtype)
    kinds = [0.0, max(2.0**-70, finfo.tiny * 4), min(1e30, finfo.max / 8), 1.0]
    blocks = []
    for b in range(9):
        scale = kinds[b % len(kinds)]
        blocks.append(torch.randn(BLOCK, generator=gen, dtype=torch.float64) * scale)
    blocks.append(torch.randn(1234, generator=gen, dtype=torch.float64))
    t = torch.cat(blocks).to(dtype)
    assert_matches_torch(grad_norm([t], norm_type), [t], norm_type)


@pytest.mark.parametrize("special", [INF, -INF, NAN])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_non_finite_value_in_a_tiny_block(dtype, norm_type, special):
    """A non-finite value in a block whose other values are tiny or zero: the block's sum is not
    finite, so it is summed again whatever its magnitudes, and the norm is inf or NaN as torch's."""
    gen = generator(145)
    t = torch.zeros(6 * BLOCK - 9, dtype=torch.float64)
    t[BLOCK : 2 * BLOCK] = torch.randn(BLOCK, generator=gen, dtype=torch.float64) * 2.0**-70
    t[3 * BLOCK :] = torch.randn(t.numel() - 3 * BLOCK, generator=gen, dtype=torch.float64)
    t = t.to(dtype)
    t[BLOCK + 777] = special
    assert_matches_torch(grad_norm([t], norm_type), [t], norm_type)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fresh_random_tensors_of_odd_sizes_and_many_magnitudes(cpu_isa, dtype, norm_type):
    """Several tensors per call, of odd sizes (1 element to many blocks), each at a magnitude drawn
    over 2^-80 .. 2^40 (limited to the dtype's range), some blocks zeroed."""
    gen = generator(146)
    finfo = torch.finfo(dtype)
    for _ in range(6):
        tensors = []
        for _ in range(int(torch.randint(1, 6, (1,), generator=gen))):
            size = int(torch.randint(1, 12 * BLOCK, (1,), generator=gen))
            exponent = float(torch.empty(1).uniform_(-80, 40, generator=gen))
            scale = min(max(2.0**exponent, finfo.tiny * 64), finfo.max / 2**20)
            t = torch.randn(size, generator=gen, dtype=torch.float64) * scale
            if size > 2 * BLOCK:
                t[BLOCK : 2 * BLOCK] = 0
            tensors.append(t.to(dtype))
        assert_matches_torch(grad_norm(tensors, norm_type), tensors, norm_type)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bits_do_not_depend_on_the_thread_count(dtype, norm_type):
    """Blocks of every kind above, in tensors cut into different pieces by 1, 2 and 3 threads."""
    gen = generator(147)
    magnitudes = [0.0, 2.0**-70, SMALLEST, 1.0, 1e4]
    tensors = []
    for i, size in enumerate([17 * BLOCK + 5, 3, 9 * BLOCK, 23 * BLOCK - 1, 4 * BLOCK + 1]):
        t = torch.randn(size, generator=gen, dtype=torch.float64)
        for b in range(0, size, BLOCK):
            t[b : b + BLOCK] *= magnitudes[(i + b // BLOCK) % len(magnitudes)]
        tensors.append(t.to(dtype))
    results = at_thread_counts(lambda: grad_norm(tensors, norm_type))
    assert_matches_torch(results[0], tensors, norm_type)
    for r in results[1:]:
        assert_same_bits(r, results[0])
