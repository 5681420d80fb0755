"""The random bits of stochastic rounding: each element of a bfloat16 state rounds up with the
probability its value sets, independently of its neighbours, of its other state slot (the two
slots of a pair share one 32-bit random stream, a half each) and of its own previous step. The
bits come from a hash of (key, element index) (csrc/optim/step_storage.h: rounding_bits); a hash
too weak to decorrelate neighbouring indices (the Weyl sequence it hashes, or a multiplication
alone) fails these, while the mean alone (test_precision.py's unbiasedness) would not see it."""

from __future__ import annotations

import math

import pytest
import torch

from fastopt import functional

N = 1 << 18
# A correlation estimated from N independent pairs has a standard deviation of 1 / sqrt(N),
# 0.002; the weak hashes above correlate neighbours by more than 0.7.
MAX_CORRELATION = 8 / math.sqrt(N)
STEP = 2**-7  # bfloat16's spacing in [1, 2)


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()


def _moments_after_step(exp_avg, exp_avg_sq, grad, step_count, device):
    """One Adam step with betas (0, 0) and lr 0: the stored moments are the grad and its square
    in float32 rounded stochastically to bfloat16."""
    param = torch.zeros(N, device=device)
    functional.adam_step_(
        [param],
        [grad],
        [exp_avg],
        [exp_avg_sq],
        [],
        [step_count],
        lr=0.0,
        beta1=0.0,
        beta2=0.0,
        eps=1e-8,
        rounding_seeds=[11],
    )
    return exp_avg > 1, exp_avg_sq > 1


@pytest.mark.usefixtures("cpu_isa")
def test_rounding_bits_are_independent_between_elements_slots_and_steps(device):
    grad_value = torch.tensor(1.0 + 0.3 * STEP)  # float32
    up_probability = [((grad_value - 1) / STEP).item(), ((grad_value**2 - 1) / STEP).item()]
    grad = torch.full((N,), grad_value.item(), device=device)
    exp_avg = torch.zeros(N, dtype=torch.bfloat16, device=device)
    exp_avg_sq = torch.zeros(N, dtype=torch.bfloat16, device=device)
    step_count = torch.zeros((), device=device)

    first = _moments_after_step(exp_avg, exp_avg_sq, grad, step_count, device)
    second = _moments_after_step(exp_avg, exp_avg_sq, grad, step_count, device)

    for ups, probability in zip(first, up_probability, strict=True):
        standard_error = math.sqrt(probability * (1 - probability) / N)
        assert abs(ups.double().mean().item() - probability) < 6 * standard_error
        for distance in (1, 2, 3, 8, 16, 17):
            assert abs(_correlation(ups[:-distance], ups[distance:])) < MAX_CORRELATION, distance
    assert abs(_correlation(first[0], first[1])) < MAX_CORRELATION
    for before, after in zip(first, second, strict=True):
        assert abs(_correlation(before, after)) < MAX_CORRELATION
