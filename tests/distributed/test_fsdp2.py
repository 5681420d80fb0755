"""Every fastopt optimizer under FSDP2 (`fully_shard`) on 2 gloo processes, against the same
torch.optim optimizer under the same FSDP2 setup, in fp64: full params and states after every
step; then distributed checkpoints (sharded with torch.distributed.checkpoint, and full state
dicts), resumed runs that continue on the same trajectory, and checkpoints moved between torch.optim
and fastopt both ways. Also FSDP2 + tensor parallel (params of two meshes in one param group) and
a torch.compile'd step.
"""

from __future__ import annotations

import copy
import functools
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from helpers.gloo_group import two_rank_tests
from helpers.optim_cases import RICH
from helpers.optim_compare import state_keys
from helpers.optim_pairs import optimizer_pair
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, init_device_mesh
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

TOLERANCE = dict(rtol=1e-12, atol=1e-12)
DTYPE = torch.float64


def _model() -> nn.Module:
    """The same small model on every rank. Its last layer has one output row: FSDP2 gives rank 1
    an empty shard of it."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3), nn.Tanh(), nn.Linear(3, 1)
    ).to(DTYPE)


def _sharded_pair(name: str) -> tuple[list[nn.Module], list[torch.optim.Optimizer]]:
    """[torch's model, fastopt's model], each the same `_model()` under `fully_shard`, with
    torch.optim.`name`(foreach=False) and fastopt.Fused`name` on them."""
    models = [fully_shard(_model()), fully_shard(_model())]
    optimizers = optimizer_pair(name, models[0].parameters(), models[1].parameters(), **RICH[name])
    return models, list(optimizers)


def _batch(step: int, model: nn.Module, data_rank: int | None = None):
    """The batch of `step`: the same for every model, and each rank its own unless `data_rank`
    says which rank's batches every rank takes."""
    rank = dist.get_rank() if data_rank is None else data_rank
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(4, 5, generator=gen, dtype=DTYPE)
    return x, torch.randn(4, model[-1].out_features, generator=gen, dtype=DTYPE)


def _train(model, optimizer, first_step: int, steps: int, step_fn=None, data_rank=None) -> None:
    """`steps` steps (`step_fn`, default optimizer.step) on the batches of first_step,
    first_step + 1, ..."""
    for step in range(first_step, first_step + steps):
        x, y = _batch(step, model, data_rank)
        nn.functional.mse_loss(model(x), y).backward()
        (step_fn or optimizer.step)()
        optimizer.zero_grad()


def _step_without_communication(optimizer: torch.optim.Optimizer) -> None:
    """optimizer.step(), checked to run no collective (CommDebugMode sees those DTensor issues
    inside its dispatch, as it would any redistribution)."""
    with CommDebugMode() as comm:
        optimizer.step()
    assert comm.get_total_counts() == 0, comm.get_comm_counts()


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _assert_same_run(name, reference, ref_opt, model, opt, where: str) -> None:
    """Full params and every state tensor of `model`/`opt` equal those of `reference`/`ref_opt`,
    and each state tensor of `opt` is laid out as its param (a DTensor of its placements, step a
    plain float32 tensor, as torch keeps it)."""
    keys = state_keys(name, RICH[name])
    for i, (r, p) in enumerate(zip(reference.parameters(), model.parameters(), strict=True)):
        torch.testing.assert_close(_full(p), _full(r), **TOLERANCE, msg=f"{where}: param {i}")
        state, ref_state = opt.state[p], ref_opt.state[r]
        assert set(state) == {"step", *keys} == set(ref_state), (where, i)
        step = state["step"]
        assert type(step) is torch.Tensor and step.dtype == torch.float32, (where, i)
        assert step.item() == ref_state["step"].item(), (where, i)
        for key in keys:
            t = state[key]
            assert isinstance(t, DTensor), (where, i, key, type(t))
            assert (t.device_mesh, t.placements) == (p.device_mesh, p.placements), (where, i, key)
            torch.testing.assert_close(
                _full(t), _full(ref_state[key]), **TOLERANCE, msg=f"{where}: {key} of param {i}"
            )


def _shared_temporary_directory() -> str:
    """A directory made by rank 0, named to every rank (the ranks share this machine's disk)."""
    path = [tempfile.mkdtemp(prefix="fastopt-dcp-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    return path[0]


def _save(model, optimizer, directory: str) -> None:
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    dcp.save(state, checkpoint_id=directory)


def _load(model, optimizer, directory: str) -> None:
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    dcp.load(state, checkpoint_id=directory)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def fsdp2_against_torch_then_checkpoints(name: str) -> None:
    (ref_model, model), (ref_opt, opt) = _sharded_pair(name)
    for step in range(3):
        _train(ref_model, ref_opt, step, 1)
        _train(model, opt, step, 1, step_fn=functools.partial(_step_without_communication, opt))
        _assert_same_run(name, ref_model, ref_opt, model, opt, f"step {step}")

    # Sharded checkpoints of both runs; then both continue: the trajectory to resume onto.
    directories = {"torch": _shared_temporary_directory(), "fastopt": _shared_temporary_directory()}
    _save(ref_model, ref_opt, directories["torch"])
    _save(model, opt, directories["fastopt"])
    # A copy, as if written to disk: the state dict holds the live step counts, which the
    # next steps increment in place (torch.optim's as well).
    full = copy.deepcopy(
        {
            "model": get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)),
            "optim": get_optimizer_state_dict(
                model, opt, options=StateDictOptions(full_state_dict=True)
            ),
        }
    )
    assert not any(isinstance(v, DTensor) for v in full["optim"]["state"]["0.weight"].values())
    _train(ref_model, ref_opt, 3, 2)
    _train(model, opt, 3, 2)
    _assert_same_run(name, ref_model, ref_opt, model, opt, "continued run")

    # Resumed from each checkpoint, by each library: the same trajectory.
    for reader, writer in [("fastopt", "fastopt"), ("fastopt", "torch"), ("torch", "fastopt")]:
        (torch_model, fastopt_model), optimizers = _sharded_pair(name)
        resumed_model = fastopt_model if reader == "fastopt" else torch_model
        resumed_opt = optimizers[1] if reader == "fastopt" else optimizers[0]
        _load(resumed_model, resumed_opt, directories[writer])
        _train(resumed_model, resumed_opt, 3, 2)
        where = f"{reader} resumed from {writer}'s sharded checkpoint"
        if reader == "fastopt":
            _assert_same_run(name, ref_model, ref_opt, resumed_model, resumed_opt, where)
        else:  # compare torch's resumed run with fastopt's continued one
            _assert_same_run(name, resumed_model, resumed_opt, model, opt, where)

    # Resumed from the full (unsharded) state dicts.
    (_, resumed_model), (_, resumed_opt) = _sharded_pair(name)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(resumed_model, full["model"], options=options)
    set_optimizer_state_dict(resumed_model, resumed_opt, full["optim"], options=options)
    _train(resumed_model, resumed_opt, 3, 2)
    _assert_same_run(name, ref_model, ref_opt, resumed_model, resumed_opt, "resumed from full")


def fsdp2_with_tensor_parallel() -> None:
    """FSDP2 over tensor parallel (a 1 x 2 mesh: dp x tp): the tensor-parallel params are
    DTensors of the 2-d mesh, the LayerNorm's of the 1-d dp mesh, all in one param group."""
    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))

    def build() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        model = parallelize_module(
            model.to(DTYPE), mesh["tp"], {"1": ColwiseParallel(), "3": RowwiseParallel()}
        )
        return fully_shard(model, mesh=mesh["dp"])

    ref_model, model = build(), build()
    assert {p.device_mesh.ndim for p in model.parameters()} == {1, 2}
    ref_opt, opt = optimizer_pair(
        "Adam", ref_model.parameters(), model.parameters(), **RICH["Adam"]
    )
    for step in range(3):  # the tp ranks share their batches
        _train(ref_model, ref_opt, step, 1, data_rank=0)
        _train(model, opt, step, 1, functools.partial(_step_without_communication, opt), 0)
        _assert_same_run("Adam", ref_model, ref_opt, model, opt, f"FSDP + TP, step {step}")


def fsdp2_compiled_step() -> None:
    """FusedAdam's step compiled whole (fullgraph: dynamo, and AOTAutograd taking the DTensors
    apart), against torch.optim.Adam in eager mode.

    The backend is aot_eager, not inductor: with torch 2.14 inductor fails on this graph in its
    decompose_auto_functionalized pass ("graph node count mismatch between eager and
    replacement") when the grads are FSDP2's, views at offsets of one reduce-scatter buffer."""
    torch._dynamo.reset()
    (ref_model, model), (ref_opt, opt) = _sharded_pair("Adam")
    counter = CompileCounterWithBackend("aot_eager")
    compiled_step = torch.compile(opt.step, fullgraph=True, backend=counter)
    for step in range(3):
        _train(ref_model, ref_opt, step, 1)
        _train(model, opt, step, 1, step_fn=compiled_step)
        _assert_same_run("Adam", ref_model, ref_opt, model, opt, f"compiled, step {step}")
    graph_ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    assert {"fastopt.adam_step_", "fastopt.adam_step_.default"} & graph_ops, graph_ops


def fsdp2_grad_scaler() -> None:
    """torch.amp.GradScaler handing grad_scale and found_inf to FusedAdam (unscaling inside the
    kernel), against torch.optim.Adam behind its own GradScaler. At step 1 an inf in rank 1's
    shard of a grad must skip the step on both ranks: GradScaler reduces found_inf across the
    mesh, and fastopt's step changes nothing where it is set."""
    (ref_model, model), (ref_opt, opt) = _sharded_pair("Adam")
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    for step in range(3):
        for m, o, scaler in zip((ref_model, model), (ref_opt, opt), scalers, strict=True):
            x, y = _batch(step, m)
            scaler.scale(nn.functional.mse_loss(m(x), y)).backward()
            if step == 1 and dist.get_rank() == 1:
                m[0].weight.grad.to_local()[0, 0] = float("inf")
            scaler.step(o)
            scaler.update()
            o.zero_grad()
        _assert_same_run("Adam", ref_model, ref_opt, model, opt, f"GradScaler, step {step}")
        assert scalers[0].get_scale() == scalers[1].get_scale()
    assert opt.state[model[0].weight]["step"].item() == 2  # the inf step was skipped


CHECKS = {
    **{
        f"fsdp2-{name}": functools.partial(fsdp2_against_torch_then_checkpoints, name)
        for name in RICH
    },
    "fsdp2-tensor-parallel": fsdp2_with_tensor_parallel,
    "fsdp2-grad-scaler": fsdp2_grad_scaler,
    "fsdp2-compiled-step": fsdp2_compiled_step,
}


outcomes, test_on_two_ranks = two_rank_tests(CHECKS)
