"""fastopt.clip_grad_norm_ under FSDP2 (`fully_shard`) on 2 gloo processes, in fp64: the same norm
(a Replicate DTensor) and the same clipped grads as torch.nn.utils.clip_grad_norm_ on the same
DTensor grads, for norm types 2 and inf; FSDP2 + tensor parallel (grads on two meshes, which
torch's cannot combine) against the norm of the full grads; a Partial DTensor refused by name.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from helpers.gloo_group import two_rank_tests
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Partial, Replicate, init_device_mesh
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

import fastopt

DTYPE = torch.float64
TOLERANCE = dict(rtol=1e-12, atol=1e-14)


def _model(out_features: int) -> nn.Module:
    """The same small model on every rank; with out_features=1 FSDP2 gives rank 1 an empty shard
    of the last bias."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, out_features)
    ).to(DTYPE)


def _backward(model: nn.Module, data_rank: int | None = None) -> None:
    rank = dist.get_rank() if data_rank is None else data_rank
    gen = torch.Generator().manual_seed(100 + rank)
    model(torch.randn(4, 5, generator=gen, dtype=DTYPE)).square().sum().backward()


def _full_grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.full_tensor() for p in model.parameters()]


def _exact_norm(grads: list[torch.Tensor], norm_type: float) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]), norm_type)


def clip_against_torch(norm_type: float, out_features: int) -> None:
    ref_model, model = fully_shard(_model(out_features)), fully_shard(_model(out_features))
    for m in (ref_model, model):
        _backward(m)
    unclipped = _full_grads(model)
    max_norm = 0.5 * _exact_norm(unclipped, norm_type).item()  # so that it clips
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm, norm_type)
    norm = fastopt.clip_grad_norm_(model.parameters(), max_norm, norm_type)
    assert isinstance(norm, DTensor) and norm.placements == (Replicate(),), norm
    assert norm.dtype == ref_norm.dtype == DTYPE
    torch.testing.assert_close(norm.full_tensor(), ref_norm.full_tensor(), **TOLERANCE)
    torch.testing.assert_close(norm.to_local(), _exact_norm(unclipped, norm_type), **TOLERANCE)
    for g, ref_g in zip(_full_grads(model), _full_grads(ref_model), strict=True):
        torch.testing.assert_close(g, ref_g, **TOLERANCE)


def clip_with_an_empty_shard_inf() -> None:
    """The inf-norm where a rank's shard is empty, which torch's clip_grad_norm_ refuses (its
    foreach max has no identity): against the norm of the full grads."""
    model = fully_shard(_model(1))
    _backward(model)
    assert any(p.to_local().numel() == 0 for p in model.parameters()) == (dist.get_rank() == 1)
    unclipped = _full_grads(model)
    norm = fastopt.clip_grad_norm_(model.parameters(), 1e-3, float("inf"))
    expected = _exact_norm(unclipped, float("inf"))
    torch.testing.assert_close(norm.full_tensor(), expected, **TOLERANCE)
    coefficient = 1e-3 / (expected + 1e-6)
    for g, u in zip(_full_grads(model), unclipped, strict=True):
        torch.testing.assert_close(g, u * coefficient, **TOLERANCE)


def clip_with_tensor_parallel() -> None:
    """FSDP2 over tensor parallel (a 1 x 2 mesh: dp x tp): grads on the 2-d mesh (sharded on tp)
    and on the 1-d dp mesh in one call; the norm is a plain tensor, the same on both ranks."""
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    model = parallelize_module(model, mesh["tp"], {"1": ColwiseParallel(), "3": RowwiseParallel()})
    model = fully_shard(model, mesh=mesh["dp"])
    assert {p.device_mesh.ndim for p in model.parameters()} == {1, 2}
    _backward(model, data_rank=0)  # the tp ranks share their batches
    unclipped = _full_grads(model)
    for norm_type in (2.0, float("inf")):
        norm = fastopt.clip_grad_norm_(model.parameters(), 1e9, norm_type)  # no clipping
        assert not isinstance(norm, DTensor)
        torch.testing.assert_close(norm, _exact_norm(unclipped, norm_type), **TOLERANCE)


def partial_refused() -> None:
    mesh = init_device_mesh("cpu", (2,))
    partial = DTensor.from_local(torch.ones(3, dtype=DTYPE), mesh, [Partial()], run_check=False)
    fastopt._dtensor.enable()
    with pytest.raises(RuntimeError, match=r"fastopt.grad_norm: tensors\[0\] is a DTensor with "):
        torch.ops.fastopt.grad_norm([partial], 2.0, None)


CHECKS = {
    "fsdp2-clip-2": functools.partial(clip_against_torch, 2.0, 1),
    "fsdp2-clip-inf": functools.partial(clip_against_torch, float("inf"), 2),
    "fsdp2-clip-1": functools.partial(clip_against_torch, 1.0, 2),
    "fsdp2-clip-inf-empty-shard": clip_with_an_empty_shard_inf,
    "fsdp2-tensor-parallel": clip_with_tensor_parallel,
    "partial-refused": partial_refused,
}


outcomes, test_on_two_ranks = two_rank_tests(CHECKS)
