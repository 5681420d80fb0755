"""fastopt::grad_norm on the CPU reads several blocks of a piece at once (csrc/optim/cpu/
grad_norm.cpp): pieces of 1 to many blocks, tensors ending in a partial block, every dtype and
norm type, against torch in float64; each block summed exactly as when read alone (the norm of a
tensor equals, bit for bit, the norm of its blocks passed as separate tensors); a non-finite value
in one of the blocks read together; blocks that need the float64 fallback read together with
blocks that do not; results bit-identical whatever the thread count."""

from __future__ import annotations

import pytest
import torch
from helpers.rng import generator
from helpers.threads import at_thread_counts, num_threads

INF = float("inf")
NAN = float("nan")
BLOCK = 4096  # elements per accumulated block (kNormBlock)
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
NORM_TYPES = [2.0, 1.0, INF, 3.0]
# Sizes of one tensor read as one piece: 1, 2, 3, 4, 5, 8 and 13 blocks, whole or ending in a
# partial block of an odd length (shorter than one turn of the accumulators, or longer).
SIZES = [
    BLOCK - 1,
    2 * BLOCK - 257,
    3 * BLOCK,
    4 * BLOCK - 1,
    5 * BLOCK - 4095,
    8 * BLOCK + 0,
    13 * BLOCK - 333,
]


def grad_norm(tensors, norm_type=2.0) -> torch.Tensor:
    return torch.ops.fastopt.grad_norm(tensors, norm_type, None)


def reference(tensors, norm_type) -> torch.Tensor:
    flat = torch.cat([t.to(torch.float64).flatten() for t in tensors])
    return torch.linalg.vector_norm(flat, norm_type)


def assert_matches_torch(result, tensors, norm_type) -> None:
    fp64 = any(t.dtype == torch.float64 for t in tensors)
    assert result.dtype == (torch.float64 if fp64 else torch.float32)
    expected = reference(tensors, norm_type).to(result.dtype)
    rtol = 1e-12 if fp64 else 2e-7
    torch.testing.assert_close(result, expected, rtol=rtol, atol=0, equal_nan=True)


def blocks_of(t: torch.Tensor) -> list[torch.Tensor]:
    """The tensor's blocks as separate tensors: each read alone, as a piece of one block."""
    return list(t.split(BLOCK))


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.view(-1).view(torch.uint8).tolist() == b.view(-1).view(torch.uint8).tolist()


@pytest.fixture
def one_thread():
    """One thread: each tensor is one piece, all its blocks read by one thread."""
    with num_threads(1):
        yield


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pieces_of_every_length_match_torch(one_thread, dtype, norm_type):
    gen = generator(31)
    for size in SIZES:
        t = torch.randn(size, generator=gen).to(dtype)
        assert_matches_torch(grad_norm([t], norm_type), [t], norm_type)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_block_is_summed_as_when_read_alone(one_thread, cpu_isa, dtype, norm_type):
    """A tensor's blocks, read together, give the bits their norms give read one by one."""
    gen = generator(32)
    for size in SIZES:
        t = torch.randn(size, generator=gen).to(dtype)
        assert_same_bits(grad_norm([t], norm_type), grad_norm(blocks_of(t), norm_type))


@pytest.mark.parametrize("special", [INF, -INF, NAN])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_non_finite_value_in_one_of_the_blocks_read_together(
    one_thread, dtype, norm_type, special
):
    """9 blocks are read as 3 ranges of 3 (the fourth range empty); the value sits in the second
    block of the third range, which also holds the tensor's partial last block."""
    gen = generator(33)
    t = torch.randn(9 * BLOCK - 100, generator=gen).to(dtype)
    t[7 * BLOCK + 1234] = special
    result = grad_norm([t], norm_type)
    assert_matches_torch(result, [t], norm_type)
    assert_same_bits(result, grad_norm(blocks_of(t), norm_type))


@pytest.mark.parametrize("norm_type", [2.0, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_in_float64_read_with_blocks_in_float32_runs(one_thread, dtype, norm_type):
    """Blocks whose largest magnitude is below 2^-50 are summed again in float64 (in float32
    their squares would underflow); here every other block is that small and the rest are zero
    (summed in float32 runs), so the result is only right if each small block took the fallback,
    whichever of the blocks read together it was."""
    gen = generator(34)
    t = torch.zeros(7 * BLOCK - 5, dtype=torch.float64)
    for b in range(0, 7, 2):
        block = t[b * BLOCK : (b + 1) * BLOCK]
        block.copy_(torch.randn(block.numel(), generator=gen, dtype=torch.float64) * 2.0**-70)
    t = t.to(dtype)
    result = grad_norm([t], norm_type)
    assert result.item() > 0
    assert_matches_torch(result, [t], norm_type)
    assert_same_bits(result, grad_norm(blocks_of(t), norm_type))


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bit_identical_whatever_the_thread_count(dtype, norm_type):
    """Different thread counts cut the tensors into different pieces, so each block is read with
    different others; the result keeps its bits."""
    gen = generator(35)
    sizes = [40 * BLOCK + 17, 3, 9 * BLOCK, 23 * BLOCK - 1, 5 * BLOCK + 1]
    tensors = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    results = at_thread_counts(lambda: grad_norm(tensors, norm_type))
    assert_matches_torch(results[0], tensors, norm_type)
    for r in results[1:]:
        assert_same_bits(r, results[0])
