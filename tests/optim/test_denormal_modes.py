"""torch.set_flush_denormal holds in every thread of a fastopt step, also when it is set after
torch's thread pool has started (whose threads otherwise keep the modes they started with), and
a step without it leaves subnormal values as torch does."""

from __future__ import annotations

import pytest
import torch
from helpers.threads import flushing_denormals, num_threads

import fastopt

N = 300_001  # several pieces: every thread of the pool takes part
SUBNORMAL = torch.finfo(torch.float32).tiny / 4


@pytest.fixture
def two_threads():
    with num_threads(2):
        yield


def _adam_over_subnormal_moments():
    """A FusedAdam and its param whose grads are zero and whose exp_avg is subnormal everywhere
    (a param whose grads stopped long ago), after a first step that started the thread pool."""
    param = torch.nn.Parameter(torch.zeros(N))
    param.grad = torch.zeros(N)
    optimizer = fastopt.FusedAdam([param], lr=1e-3)
    optimizer.step()
    optimizer.state[param]["exp_avg"].fill_(SUBNORMAL)
    return param, optimizer


def _step_flushing_denormals(optimizer) -> None:
    """One step with torch.set_flush_denormal(True) set in this thread only (after the pool's
    threads started), cleared after."""
    with flushing_denormals():
        optimizer.step()


def test_flush_denormal_set_after_the_pool_started_holds_in_every_thread(two_threads):
    param, optimizer = _adam_over_subnormal_moments()
    _step_flushing_denormals(optimizer)
    # Read as zero (denormals-are-zero) in every element, whichever thread updated it.
    assert bool((optimizer.state[param]["exp_avg"] == 0).all())
    assert bool((param.detach() == 0).all())


def test_without_flush_denormal_a_step_keeps_subnormals_as_torch_does(two_threads):
    if torch.set_flush_denormal(True):  # the pool's threads may have started flushing
        torch.set_flush_denormal(False)
    param, optimizer = _adam_over_subnormal_moments()
    reference = torch.nn.Parameter(param.detach().clone())
    reference.grad = param.grad.clone()
    torch_optimizer = torch.optim.Adam([reference], lr=1e-3, foreach=False)
    torch_optimizer.step()
    torch_optimizer.state[reference]["exp_avg"].copy_(optimizer.state[param]["exp_avg"])
    torch_optimizer.state[reference]["exp_avg_sq"].copy_(optimizer.state[param]["exp_avg_sq"])
    optimizer.step()
    torch_optimizer.step()
    exp_avg = optimizer.state[param]["exp_avg"]
    assert bool((exp_avg != 0).all()) and bool(
        (exp_avg.abs() < torch.finfo(torch.float32).tiny).all()
    )
    torch.testing.assert_close(exp_avg, torch_optimizer.state[reference]["exp_avg"], rtol=0, atol=0)
    # The update from the subnormal moments reached every element (torch multiplies by the step
    # size before it divides, which loses bits in the subnormal range: equal to a tolerance).
    assert bool((param.detach() != 0).all())
    torch.testing.assert_close(param.detach(), reference.detach())


def test_flush_denormal_holds_in_every_thread_of_a_sparse_adagrad_step(two_threads):
    """The sparse Adagrad step runs its own parallel region: the same there, over sums in the
    subnormal range and zero grads in every row (enough rows for every thread to take some)."""
    rows, width = 4000, 64
    param = torch.nn.Parameter(torch.zeros(rows, width))
    optimizer = fastopt.FusedAdagrad([param], lr=0.1)
    every_row = torch.arange(rows).unsqueeze(0)
    zeros = torch.zeros(rows, width)
    param.grad = torch.sparse_coo_tensor(every_row, zeros, (rows, width), check_invariants=True)
    optimizer.step()
    optimizer.state[param]["sum"].fill_(SUBNORMAL)
    _step_flushing_denormals(optimizer)
    assert bool((optimizer.state[param]["sum"] == 0).all())
