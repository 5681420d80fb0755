"""fastopt's optimizers inside torch's ZeroRedundancyOptimizer (DDP with the optimizer state
sharded across ranks; 2 gloo processes), with master weights and bfloat16 state: its consolidated
state_dict, loaded into a fresh one, resumes the run bit for bit. ZeroRedundancyOptimizer puts
each param's saved state into its local optimizer directly, bypassing that optimizer's
load_state_dict."""

from __future__ import annotations

import copy
import functools

import torch
import torch.distributed as dist
from helpers.gloo_group import two_rank_tests
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

import fastopt


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4)).bfloat16()


def _zero(model: nn.Module, options: dict) -> ZeroRedundancyOptimizer:
    torch.manual_seed(1)  # the rounding seeds, alike in both runs
    return ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=fastopt.FusedAdamW, lr=1e-2, **options
    )


def _train(model: nn.Module, optimizer, first_step: int, steps: int) -> None:
    for step in range(first_step, first_step + steps):
        gen = torch.Generator().manual_seed(100 * step + dist.get_rank())
        model(torch.randn(5, 8, generator=gen).bfloat16()).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def resumes_bit_for_bit(options: dict) -> None:
    model = DistributedDataParallel(_model())
    optimizer = _zero(model, options)
    _train(model, optimizer, 0, 3)
    optimizer.consolidate_state_dict(to=0)
    saved = [optimizer.state_dict() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(saved, src=0)
    saved = copy.deepcopy(saved[0])  # as if written to disk: not the live step counts
    resumed_model = DistributedDataParallel(_model())
    resumed_model.module.load_state_dict(model.module.state_dict())
    resumed = _zero(resumed_model, options)
    resumed.load_state_dict(saved)
    _train(model, optimizer, 3, 2)
    _train(resumed_model, resumed, 3, 2)
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
        if p in optimizer.optim.state:  # this rank's shard of the state
            state, resumed_state = optimizer.optim.state[p], resumed.optim.state[q]
            for key, value in state.items():
                other = resumed_state[key]
                if isinstance(value, torch.Tensor):
                    assert value.dtype == other.dtype and torch.equal(value, other), key
                else:
                    assert value == other, key


CHECKS = {
    f"master-{name}": functools.partial(
        resumes_bit_for_bit, dict(master_weights=master_weights, state_dtype=torch.bfloat16)
    )
    for name, master_weights in (("float32", True), ("remainder", "remainder"))
}


outcomes, test_on_two_ranks = two_rank_tests(CHECKS)
