"""The precision options under FSDP2 (`fully_shard`) on 2 gloo processes: clipping inside the
step against torch's DTensor clip_grad_norm_ + torch.optim (fp64, norm types 2 and inf), and
bfloat16 params with master weights whose master copies are sharded as their params."""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from helpers.gloo_group import two_rank_tests
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import fastopt

TOLERANCE = dict(rtol=1e-12, atol=1e-12)


def _model(dtype: torch.dtype) -> nn.Module:
    """The same small model on every rank; no rank gets an empty shard, which torch's inf-norm
    refuses (fastopt's takes it: tests/distributed/test_grad_norm_fsdp2.py)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).to(dtype)


def _backward(model: nn.Module, step: int) -> None:
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(1000 * step + dist.get_rank())
    model(torch.randn(4, 5, generator=gen).to(dtype)).float().square().sum().backward()


def clipping_against_torch(name: str, norm_type: float) -> None:
    ref_model, model = fully_shard(_model(torch.float64)), fully_shard(_model(torch.float64))
    ref_opt = getattr(torch.optim, name)(ref_model.parameters(), lr=1e-2)
    opt = getattr(fastopt, f"Fused{name}")(
        model.parameters(), lr=1e-2, max_grad_norm=0.05, norm_type=norm_type
    )
    for step in range(3):
        for m in (ref_model, model):
            _backward(m, step)
        expected = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05, norm_type)
        ref_opt.step()
        norm = opt.step()
        torch.testing.assert_close(_full(norm), _full(expected), **TOLERANCE)
        ref_opt.zero_grad()
        opt.zero_grad()
    for r, p in zip(ref_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(p.full_tensor(), r.full_tensor(), **TOLERANCE)


def master_weights_are_sharded_as_their_params() -> None:
    model = fully_shard(_model(torch.bfloat16))
    opt = fastopt.FusedAdamW(model.parameters(), lr=1e-2, master_weights=True, max_grad_norm=1.0)
    for step in range(2):
        _backward(model, step)
        opt.step()
        opt.zero_grad()
    for p in model.parameters():
        master = opt.state[p]["master_param"]
        assert isinstance(master, DTensor) and master.placements == p.placements
        assert master.dtype == torch.float32
        assert torch.equal(master.to_local().bfloat16(), p.to_local())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


CHECKS = {
    **{
        f"{name}-clip-{norm}": functools.partial(clipping_against_torch, name, norm_type)
        for name in ("Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta")
        for norm, norm_type in (("2", 2.0), ("inf", float("inf")))
    },
    "master-weights": master_weights_are_sharded_as_their_params,
}


outcomes, test_on_two_ranks = two_rank_tests(CHECKS)
