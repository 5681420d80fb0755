"""How the CUDA multi-tensor driver splits a step into launches, at each boundary of a launch's
capacity (csrc/optim/cuda/multi_tensor_apply.cuh: 255 tensors with CUDA 13's 32 KB of kernel
parameters, 36 with older toolkits; 320 chunks of 65536 elements): against torch, on a GPU or
through the emulated CUDA kernels.

The shapes put the boundary at a tensor of several chunks, which the other tests never do: the
last tensor a launch can take has several chunks (the launch ends with it), or more chunks than
the launch has blocks left (it goes on in the next launch, from the first slot).
"""

from __future__ import annotations

import pytest
import torch
from helpers.cuda import ON_CUDA_KERNELS, cuda_kernels
from helpers.optim_cases import RICH
from helpers.optim_compare import step_and_compare
from helpers.optim_pairs import fp64_twin, make_param_pairs, optimizer_pair
from helpers.rng import generator

pytestmark = ON_CUDA_KERNELS

CHUNK = 65536
BLOCKS_PER_LAUNCH = 320


def small_shapes(count: int, seed: int) -> list[tuple[int, ...]]:
    """`count` one-chunk tensors of assorted small sizes."""
    sizes = torch.randint(1, 300, (count,), generator=generator(seed)).tolist()
    return [(s,) for s in sizes]


def run_case(name: str, shapes: list[tuple[int, ...]], seed: int) -> None:
    """Two steps against torch, within twice torch's own rounding noise (among millions of
    elements, grad + weight_decay * param cancels to a few ulps somewhere; see test_cuda.py)."""
    with cuda_kernels() as device:
        ref_params, fast_params = make_param_pairs(shapes, device=device, seed=seed)
        ref, fast = optimizer_pair(name, ref_params, fast_params, **RICH[name])
        exact = fp64_twin(name, ref_params, **RICH[name])
        step_and_compare(ref, fast, ref_params, fast_params, generator(seed + 1), 2, exact=exact)


@pytest.mark.parametrize("name", ["Adam", "Adagrad"])
@pytest.mark.parametrize("tensors_per_launch", [36, 255])
def test_the_last_tensor_of_a_launch_has_several_chunks(name, tensors_per_launch):
    """The launch's last tensor slot goes to a 3-chunk tensor; more tensors follow."""
    shapes = small_shapes(tensors_per_launch - 1, seed=1)
    shapes += [(2 * CHUNK + 17,)] + small_shapes(5, seed=2)
    run_case(name, shapes, seed=3)


@pytest.mark.parametrize("name", ["Adam", "Adagrad"])
@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_tensor_counts_around_a_full_launch(name, offset):
    """255 + offset one-chunk tensors (and 36 * 7 + offset): a launch full of tensors exactly, one
    short of full, and one over."""
    for per_launch in (36, 255):
        count = per_launch * (7 if per_launch == 36 else 1) + offset
        run_case(name, small_shapes(count, seed=4), seed=5)


@pytest.mark.parametrize("name", ["Adam", "Adagrad"])
def test_the_last_tensor_of_a_launch_goes_on_in_the_next(name):
    """254 one-chunk tensors, then one whose 71 chunks overflow the launch's 320 blocks: it ends
    the first launch in its last tensor slot and goes on from slot 0 of the second."""
    shapes = small_shapes(254, seed=6)
    shapes += [((BLOCKS_PER_LAUNCH - 254 + 5) * CHUNK - 3,)] + small_shapes(3, seed=7)
    run_case(name, shapes, seed=8)
