"""Sparse Adagrad where a row repeats many times in one gradient (a frequent token), and gradients
with more entries than a launch has blocks, against torch.optim.Adagrad's sparse path.

The CUDA kernel cuts the row-sorted entries into windows of 256 (csrc/optim/cuda/sparse_adagrad.cu)
and sums a run that crosses windows piece by piece: the run lengths here start and end on each
side of window boundaries. Run on the CPU kernel too, which must agree.
"""

from __future__ import annotations

import pytest
import torch
from helpers.optim_compare import assert_matches_reference
from helpers.optim_pairs import optimizer_pair
from helpers.rng import generator
from helpers.tolerances import FP32, TOLERANCES

import fastopt.functional as F

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")

WINDOW = 256


def _grad(rows: list[int], shape: tuple[int, ...], dtype, device, seed: int) -> torch.Tensor:
    """An uncoalesced sparse grad with one entry per item of `rows`, shuffled."""
    gen = generator(seed)
    index = torch.tensor(rows)[torch.randperm(len(rows), generator=gen)]
    values = torch.randn((len(rows), *shape[1:]), generator=gen, dtype=torch.float64)
    return torch.sparse_coo_tensor(index[None].to(device), values.to(dtype).to(device), shape)


def _run_lengths(lengths: list[int], seed: int) -> list[int]:
    """Rows (distinct, in random order) repeated as often as `lengths` says."""
    order = torch.randperm(len(lengths) * 3, generator=generator(seed))[: len(lengths)].tolist()
    return [row for row, n in zip(order, lengths, strict=True) for _ in range(n)]


CASES = {
    # A row repeated 1000 times among rows seen once or twice.
    "hot-row": [1] * 40 + [1000] + [2] * 30,
    # Runs that end one before, at, and one after a window boundary, runs over several windows.
    "around-windows": [255, 1, 256, 257, 2 * WINDOW - 1, 3, 3 * WINDOW + 1, 1, WINDOW],
    # A window filled by one run, then more windows of the same row.
    "whole-windows": [WINDOW, 4 * WINDOW, 7],
}


def _check(rows, shape, dtype, device, steps=3, lr=0.1, **options):
    start = torch.randn(shape, generator=generator(9), dtype=torch.float64).to(device, dtype)
    ref_p, fast_p = start.clone().requires_grad_(), start.clone().requires_grad_()
    ref, fast = optimizer_pair("Adagrad", [ref_p], [fast_p], lr=lr, **options)
    rtol, atol = TOLERANCES[dtype]
    for step in range(steps):
        grad = _grad(rows, shape, dtype, device, seed=10 + step)
        ref_p.grad, fast_p.grad = grad.clone(), grad.clone()
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, [ref_p], [fast_p], rtol, atol, f"step {step}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_long_runs_of_one_row(device, case, dtype):
    rows = _run_lengths(CASES[case], seed=1)
    _check(rows, (3 * len(CASES[case]), 5), dtype, device, lr_decay=0.1, maximize=True)


def test_more_entries_than_a_launch_has_blocks(device):
    """20000 entries: more than the 8192 blocks of a launch, so blocks take several entries."""
    rows = torch.randint(0, 3000, (20000,), generator=generator(2)).tolist()
    _check(rows, (3000, 3), torch.float32, device, steps=2)


def test_grad_scale_unscales_every_entry_of_a_long_run(device):
    """With grad_scale, the grad's values are stored back unscaled, entries of long runs too."""
    rows = _run_lengths(CASES["around-windows"], seed=3)
    shape = (3 * len(CASES["around-windows"]), 4)
    grad = _grad(rows, shape, torch.float32, device, seed=4)
    param = torch.randn(shape, generator=generator(5)).to(device)
    state_sum, step = torch.zeros_like(param), torch.zeros((), device=device)
    expected_param = param.clone().requires_grad_()
    ref = torch.optim.Adagrad([expected_param], lr=0.1, foreach=False)
    expected_param.grad = grad.clone() / 8
    ref.step()
    values = grad._values().clone()
    F.sparse_adagrad_step_(
        param, grad, state_sum, step, lr=0.1, grad_scale=torch.tensor(8.0, device=device)
    )
    torch.testing.assert_close(grad._values(), values / 8, rtol=0, atol=0)
    torch.testing.assert_close(param, expected_param.detach(), **FP32)
    assert step.item() == 1.0
