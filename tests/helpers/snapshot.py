"""What a step may change, copied before and compared after: for the tests of a step that must
change nothing (bad input, a skipped AMP step)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor


def snapshot(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict:
    """Copies of everything a step may change: params, grads, and the whole optimizer state."""
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.clone() for p in params],
        "state_keys": [p in opt.state for p in params],
        "state": {
            i: copy.deepcopy(dict(opt.state[p])) for i, p in enumerate(params) if p in opt.state
        },
    }


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.layout != b.layout or a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.device.type == "meta":
        return True
    if a.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_unchanged(opt: torch.optim.Optimizer, params: Sequence[Tensor], before: dict) -> None:
    """Nothing that `snapshot` copied has changed, and no state was created or dropped."""
    after = snapshot(opt, params)
    for i in range(len(params)):
        assert _same(after["params"][i], before["params"][i]), f"param {i} changed"
        assert _same(after["grads"][i], before["grads"][i]), f"grad of param {i} changed"
        assert after["state_keys"][i] == before["state_keys"][i], f"state of param {i} created"
    assert after["state"].keys() == before["state"].keys()
    for i, state in before["state"].items():
        assert after["state"][i].keys() == state.keys(), f"state keys of param {i} changed"
        for key, value in state.items():
            assert _same(after["state"][i][key], value), f"state {key!r} of param {i} changed"
