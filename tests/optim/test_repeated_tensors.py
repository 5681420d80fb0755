"""A param or a step counter listed twice in one optimizer op would be updated twice (in a race on
a GPU): every op refuses it on every device, naming both places, before anything changes."""

from __future__ import annotations

import pytest
import torch
from helpers.rng import generator

import fastopt.functional as F


def _lists(device: str, count: int = 4) -> dict[str, list[torch.Tensor]]:
    gen = generator(0)

    def fresh(shape=(7, 3)):
        return [torch.randn(shape, generator=gen).to(device) for _ in range(count)]

    return {
        "params": fresh(),
        "grads": fresh(),
        "state": fresh(),
        "steps": [torch.full((), 2.0, device=device) for _ in range(count)],
    }


def _adagrad(lists, lr=0.1) -> None:
    F.adagrad_step_(lists["params"], lists["grads"], lists["state"], lists["steps"], lr=lr)


def _adam(lists, lr=0.1) -> None:
    state = lists["state"]
    F.adam_step_(
        lists["params"],
        lists["grads"],
        state,
        [s.clone() for s in state],
        [],
        lists["steps"],
        lr=lr,
        beta1=0.9,
        beta2=0.99,
        eps=1e-8,
    )


@pytest.mark.parametrize("step", [_adagrad, _adam], ids=["adagrad", "adam"])
@pytest.mark.parametrize("repeated", ["params", "steps"])
def test_a_tensor_listed_twice_is_refused_before_anything_changes(device, step, repeated):
    lists = _lists(device)
    lists[repeated][3] = lists[repeated][1]
    before = {key: [t.clone() for t in ts] for key, ts in lists.items()}
    with pytest.raises(RuntimeError, match=rf"{repeated}\[3\] is {repeated}\[1\] again"):
        step(lists)
    for key, tensors in lists.items():
        for i, (t, b) in enumerate(zip(tensors, before[key], strict=True)):
            assert torch.equal(t, b), f"{key}[{i}] changed"


def test_distinct_views_of_one_buffer_and_repeated_empty_tensors_are_accepted(device):
    """Only the same memory twice is refused: views of one buffer that do not overlap are
    separate params, and an empty tensor holds no memory to update."""
    lists = _lists(device, count=2)
    buffer = torch.randn(14, generator=generator(1)).to(device)
    lists["params"] = [buffer[:7], buffer[7:]]
    lists["grads"] = [g.flatten()[:7] for g in lists["grads"]]
    lists["state"] = [torch.zeros(7, device=device) for _ in range(2)]
    expected = [p.clone() for p in lists["params"]]
    _adagrad(lists)
    for p, e in zip(lists["params"], expected, strict=True):
        assert not torch.equal(p, e)  # stepped
    empty = torch.empty(0, device=device)
    lists = {
        "params": [empty, empty],
        "grads": [empty, empty],
        "state": [empty, empty],
        "steps": [torch.zeros((), device=device) for _ in range(2)],
    }
    _adagrad(lists)
    assert [s.item() for s in lists["steps"]] == [1.0, 1.0]
