"""A bfloat16 training run under FSDP2 (`fully_shard`, 2 gloo processes) with the precision
options (master weights or remainders, bfloat16 state, clipping), checkpointed and resumed as
large-model trainers do: with torch.distributed.checkpoint (sharded), and through full state dicts
(gathered, also offloaded to rank 0's CPU and broadcast back). The resumed run must continue bit
for bit as the uninterrupted one, state included. Also a sharded checkpoint of torch.optim loaded
into fastopt with master weights."""

from __future__ import annotations

import copy
import functools
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers.gloo_group import two_rank_tests
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import fastopt


class _Block(nn.Module):
    """A pre-norm transformer block, small."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


def _model() -> nn.Module:
    """Two bfloat16 blocks, each sharded, then the whole, as FSDP2 is applied to transformers."""
    torch.manual_seed(0)
    model = nn.Sequential(_Block(), _Block()).bfloat16()
    for block in model:
        fully_shard(block)
    return fully_shard(model)


def _optimizer(model: nn.Module, name: str, options: dict) -> torch.optim.Optimizer:
    torch.manual_seed(1)  # the rounding seeds, alike on every rank and in every run
    return getattr(fastopt, name)(model.parameters(), **options)


def _train(model: nn.Module, optimizer, first_step: int, steps: int) -> None:
    for step in range(first_step, first_step + steps):
        gen = torch.Generator().manual_seed(100 * step + dist.get_rank())
        x = torch.randn(2, 5, 16, generator=gen).bfloat16()
        model(x).float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _shared_temporary_directory() -> str:
    path = [tempfile.mkdtemp(prefix="fastopt-dcp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def _local(t):
    return t.to_local() if isinstance(t, DTensor) else t


def _assert_same_run(model, optimizer, resumed_model, resumed_optimizer, where: str) -> None:
    """The same params and state, bit for bit, each state entry of the same type, dtype and
    placements (compared shard by shard: gloo gathers no int16 remainders)."""
    pairs = zip(model.named_parameters(), resumed_model.parameters(), strict=True)
    for (name, p), q in pairs:
        assert torch.equal(_local(p), _local(q)), f"{where}: {name}"
        state, resumed = optimizer.state[p], resumed_optimizer.state[q]
        assert set(state) == set(resumed), (where, name, set(state), set(resumed))
        for key, value in state.items():
            other = resumed[key]
            if not isinstance(value, torch.Tensor):
                assert value == other, (where, name, key, value, other)
                continue
            assert (type(value), value.dtype) == (type(other), other.dtype), (where, name, key)
            if isinstance(value, DTensor):
                assert value.placements == other.placements, (where, name, key)
            assert torch.equal(_local(value), _local(other)), f"{where}: {key} of {name}"


def resumes_bit_for_bit(name: str, options: dict, how: str) -> None:
    """3 steps, a checkpoint, 3 more steps; a fresh model and optimizer resumed from the
    checkpoint take the same 3 steps and must end where the uninterrupted run did."""
    model = _model()
    optimizer = _optimizer(model, name, options)
    _train(model, optimizer, 0, 3)
    if how == "sharded":
        directory = _shared_temporary_directory()
        dcp.save(
            {
                "model": get_model_state_dict(model),
                "optim": get_optimizer_state_dict(model, optimizer),
            },
            checkpoint_id=directory,
        )
    else:  # full state dicts: gathered on every rank, or on rank 0's CPU only
        save_options = StateDictOptions(full_state_dict=True, cpu_offload=how == "full-rank0")
        # A copy, as if written to disk: the state dict holds the live step counts.
        saved = copy.deepcopy(
            {
                "model": get_model_state_dict(model, options=save_options),
                "optim": get_optimizer_state_dict(model, optimizer, options=save_options),
            }
        )
    _train(model, optimizer, 3, 3)

    resumed_model = _model()
    resumed_optimizer = _optimizer(resumed_model, name, options)
    if how == "sharded":
        saved = {
            "model": get_model_state_dict(resumed_model),
            "optim": get_optimizer_state_dict(resumed_model, resumed_optimizer),
        }
        dcp.load(saved, checkpoint_id=directory)
        load_options = None
    else:
        load_options = StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=how == "full-rank0"
        )
    set_model_state_dict(resumed_model, saved["model"], options=load_options)
    set_optimizer_state_dict(resumed_model, resumed_optimizer, saved["optim"], options=load_options)
    _train(resumed_model, resumed_optimizer, 3, 3)
    _assert_same_run(model, optimizer, resumed_model, resumed_optimizer, f"{name} {options} {how}")


def loads_a_torch_checkpoint(options: dict) -> None:
    """A sharded checkpoint of torch.optim.AdamW, loaded into FusedAdamW with master weights:
    DCP then needs allow_partial_load (the checkpoint has no master copies or seeds), and leaves
    the template's master copies, made from the fresh model, where the checkpoint has none; they
    must not be used (they would put the fresh model's params back at the next step). The run
    must continue as one loaded from torch's full state dict, which has no master copies."""
    model = _model()
    torch_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, torch_optimizer, 0, 2)
    directory = _shared_temporary_directory()
    saved = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, torch_optimizer),
    }
    dcp.save(saved, checkpoint_id=directory)
    full_options = StateDictOptions(full_state_dict=True)
    full = copy.deepcopy(get_optimizer_state_dict(model, torch_optimizer, options=full_options))

    resumed_model, expected_model = _model(), _model()
    resumed = _optimizer(resumed_model, "FusedAdamW", options)
    expected = _optimizer(expected_model, "FusedAdamW", options)
    loaded = {
        "model": get_model_state_dict(resumed_model),
        "optim": get_optimizer_state_dict(resumed_model, resumed),
    }
    dcp.load(loaded, checkpoint_id=directory, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_model_state_dict(resumed_model, loaded["model"])
    set_optimizer_state_dict(resumed_model, resumed, loaded["optim"])
    set_model_state_dict(expected_model, get_model_state_dict(model))
    set_optimizer_state_dict(expected_model, expected, full, options=full_options)
    for m, o in ((resumed_model, resumed), (expected_model, expected)):
        _train(m, o, 2, 2)
    _assert_same_run(expected_model, expected, resumed_model, resumed, f"from torch, {options}")


_MASTER_BF16_CLIP = dict(master_weights=True, state_dtype=torch.bfloat16, max_grad_norm=1.0)
_REMAINDER_BF16_CLIP = dict(
    master_weights="remainder", state_dtype=torch.bfloat16, max_grad_norm=1.0
)
_RUNS = {
    "adamw-master": ("FusedAdamW", dict(lr=1e-2, **_MASTER_BF16_CLIP)),
    "adamw-remainder": ("FusedAdamW", dict(lr=1e-2, **_REMAINDER_BF16_CLIP)),
    "adam-amsgrad-master-inf-clip": (
        "FusedAdam",
        dict(lr=1e-2, amsgrad=True, master_weights=True, max_grad_norm=0.5, norm_type=float("inf")),
    ),
    "rmsprop-remainder": (
        "FusedRMSprop",
        dict(lr=1e-3, momentum=0.9, centered=True, **_REMAINDER_BF16_CLIP),
    ),
    "adagrad-master": ("FusedAdagrad", dict(lr=1e-2, **_MASTER_BF16_CLIP)),
    "adadelta-master": ("FusedAdadelta", dict(lr=1.0, **_MASTER_BF16_CLIP)),
}

CHECKS = {
    f"{run}-{how}": functools.partial(resumes_bit_for_bit, *_RUNS[run], how)
    for run in _RUNS
    for how in ("sharded", "full", "full-rank0")
} | {
    # float32 state: no rounding seeds, which each path draws at its own time
    f"from-torch-{name}": functools.partial(
        loads_a_torch_checkpoint, dict(master_weights=master_weights, max_grad_norm=1.0)
    )
    for name, master_weights in (("master", True), ("remainder", "remainder"))
}


outcomes, test_on_two_ranks = two_rank_tests(CHECKS)
