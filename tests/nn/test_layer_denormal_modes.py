"""torch.set_flush_denormal holds in every thread of the layers' CPU kernels, as in the optimizer
steps (tests/optim/test_denormal_modes.py), also when it is set after torch's thread pool has
started: the pool's threads otherwise keep the modes they started with, and the pieces they
compute keep subnormal results that the caller's thread flushes. Each case makes every output
element subnormal (and shows it is, without the flag), over enough work for two threads."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from helpers.threads import flushing_denormals, num_threads
from torch import nn

import fastopt

TINY = 1e-21  # normal; a product of two is 1e-42, subnormal, and so is a sum of a few thousand


@pytest.fixture(autouse=True)
def two_threads():
    with num_threads(2):
        yield


def _flushing_denormals(fn: Callable[[], list[torch.Tensor]]) -> list[torch.Tensor]:
    """fn() with torch.set_flush_denormal(True) set in this thread only, after a first call of fn
    that started the pool's threads (with the flag cleared)."""
    torch.set_flush_denormal(False)
    fn()
    with flushing_denormals():
        return fn()


def _all_subnormal(t: torch.Tensor) -> bool:
    return bool(((t != 0) & (t.abs() < torch.finfo(t.dtype).tiny)).all())


def _blocksparse_forward_and_grads() -> list[torch.Tensor]:
    layer = fastopt.nn.BlockSparseLinear(128, 128, block_size=32, density=1.0)
    with torch.no_grad():
        layer.values.fill_(TINY)
        layer.bias.zero_()
    x = torch.full((2048, 128), TINY, requires_grad=True)
    out = layer(x)
    out.backward(torch.full_like(out, TINY))
    # forward and grad_input (the dsd kernel), grad of the values (the sdd kernel)
    return [out.detach(), x.grad, layer.values.grad]


def _int8_forward() -> list[torch.Tensor]:
    linear = nn.Linear(64, 256)
    with torch.no_grad():
        linear.weight.fill_(TINY)
        linear.bias.zero_()
    layer = fastopt.nn.Int8Linear.from_float(linear)
    with torch.no_grad():
        # the rows' quantization (its scale stays normal) and the tiles' epilogue
        return [layer(torch.full((4096, 64), TINY))]


@pytest.mark.parametrize(
    "kernels", [_blocksparse_forward_and_grads, _int8_forward], ids=["blocksparse", "int8"]
)
def test_flush_denormal_holds_in_every_thread_of_a_layer(kernels):
    torch.set_flush_denormal(False)
    assert all(_all_subnormal(t) for t in kernels())
    for result in _flushing_denormals(kernels):
        assert bool((result == 0).all())
