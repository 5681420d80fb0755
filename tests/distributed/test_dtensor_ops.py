"""fastopt.functional's optimizer steps on DTensors, on 2 gloo processes: Shard(0) and Replicate
params (and, in the same call, a plain tensor and a param of a 2-d mesh) against torch.optim on
the full tensors, in fp64; and the layouts the ops refuse, with their messages, changing nothing.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers.gloo_group import two_rank_tests
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Replicate,
    Shard,
    distribute_tensor,
    init_device_mesh,
)

import fastopt
from fastopt import functional

DTYPE = torch.float64
TOLERANCE = dict(rtol=1e-12, atol=1e-12)

# Per optimizer: torch.optim's arguments, the functional step, its state tensors in the op's
# order (torch's keys), and the step's keyword arguments (the same optimizer).
STEPS = {
    "Adam": (
        dict(lr=0.05, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, amsgrad=True),
        functional.adam_step_,
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
        dict(lr=0.05, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.1, amsgrad=True),
    ),
    "RMSprop": (
        dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5, centered=True),
        functional.rmsprop_step_,
        ("square_avg", "momentum_buffer", "grad_avg"),
        dict(lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5, centered=True),
    ),
    "Adagrad": (
        dict(lr=0.1, lr_decay=0.1, weight_decay=0.1, eps=1e-6),
        functional.adagrad_step_,
        ("sum",),
        dict(lr=0.1, lr_decay=0.1, weight_decay=0.1, eps=1e-6),
    ),
    "Adadelta": (
        dict(lr=0.5, rho=0.8, eps=1e-6, weight_decay=0.1),
        functional.adadelta_step_,
        ("square_avg", "acc_delta"),
        dict(lr=0.5, rho=0.8, eps=1e-6, weight_decay=0.1),
    ),
}


def _layouts():
    """(shape, how to lay a full tensor out) of the params of one call: Shard(0) (with a 1-row
    param, whose shard on rank 1 is empty) and Replicate on a 1-d mesh, Shard(0) on a 2-d mesh,
    and a plain tensor."""
    line = init_device_mesh("cpu", (2,))
    square = init_device_mesh("cpu", (1, 2))

    def on(mesh, placements):
        return lambda t: distribute_tensor(t, mesh, placements)

    return [
        ((7, 3), on(line, [Shard(0)])),
        ((1,), on(line, [Shard(0)])),
        ((5,), on(line, [Replicate()])),
        ((4, 2), on(square, [Replicate(), Shard(0)])),
        ((3,), lambda t: t.clone()),
    ]


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def functional_step_against_torch(name: str, lr_layout=None, compiled=False) -> None:
    """Three steps of fastopt.functional's step `name` against torch.optim.`name`; with
    `lr_layout`, the step takes its lr as the tensor lr_layout(tensor lr); `compiled`: the step
    is torch.compile'd (fullgraph, inductor)."""
    torch_options, step_, keys, options = STEPS[name]
    if compiled:
        torch._dynamo.reset()
        step_ = torch.compile(step_, fullgraph=True)
    if lr_layout is not None:
        options = options | {"lr": lr_layout(torch.tensor(options["lr"], dtype=DTYPE))}
    layouts = _layouts()
    gen = torch.Generator().manual_seed(0)  # the same on every rank
    starts = [torch.randn(shape, generator=gen, dtype=DTYPE) for shape, _ in layouts]
    ref_params = [s.clone().requires_grad_() for s in starts]
    ref_opt = getattr(torch.optim, name)(ref_params, foreach=False, **torch_options)
    params = [lay(s) for s, (_, lay) in zip(starts, layouts, strict=True)]
    states = {key: [torch.zeros_like(p) for p in params] for key in keys}
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    for step in range(3):
        grads = [torch.randn(s.shape, generator=gen, dtype=DTYPE) for s in starts]
        for p, g in zip(ref_params, grads, strict=True):
            p.grad = g.clone()
        ref_opt.step()
        laid_out = [lay(g) for g, (_, lay) in zip(grads, layouts, strict=True)]
        step_(params, laid_out, *states.values(), steps, **options)
        for i, (p, r) in enumerate(zip(params, ref_params, strict=True)):
            where = f"{name}, step {step}, param {i}"
            torch.testing.assert_close(_full(p), r.detach(), **TOLERANCE, msg=where)
            assert steps[i].item() == ref_opt.state[r]["step"].item(), where
            for key in keys:
                t = states[key][i]
                assert type(t) is type(p), where
                torch.testing.assert_close(
                    _full(t), ref_opt.state[r][key], **TOLERANCE, msg=f"{where}: {key}"
                )


def _adam_inputs(layout: dict[str, object]):
    """adam_step_'s lists for one param of shape (6, 2), as its positional arguments: each
    tensor laid out by `layout[name]`, by default Shard(0) on a 1-d mesh (a plain step count)."""
    line = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(1)
    args = []
    for name in ("params", "grads", "exp_avgs", "exp_avg_sqs"):
        full = torch.randn((6, 2), generator=gen, dtype=DTYPE).abs()
        lay = layout.get(name, lambda t: distribute_tensor(t, line, [Shard(0)]))
        args.append([lay(full)])
    steps = [layout.get("steps", lambda t: t)(torch.tensor(3.0))]
    return (*args, [], steps)


def _local_copies(args) -> list[torch.Tensor]:
    return [(t.to_local() if isinstance(t, DTensor) else t).clone() for ts in args for t in ts]


def refused_layouts() -> None:
    line = init_device_mesh("cpu", (2,))
    square = init_device_mesh("cpu", (1, 2))
    cases = {
        r"exp_avgs\[0\] is a DTensor with placements \(Replicate\(\),\) .* but params\[0\] has "
        r"placements \(Shard\(dim=0\),\) .* tensor.redistribute\(param.device_mesh, "
        r"param.placements\)": {"exp_avgs": lambda t: distribute_tensor(t, line, [Replicate()])},
        r"grads\[0\] is a DTensor with placements \(Replicate\(\), Shard\(dim=0\)\) on "
        r"DeviceMesh\(\(1, 2\).* but params\[0\] has placements \(Shard\(dim=0\),\) on "
        r"DeviceMesh\(\(2,\)": {
            "grads": lambda t: distribute_tensor(t, square, [Replicate(), Shard(0)])
        },
        r"params\[0\] is a DTensor .* but exp_avg_sqs\[0\] is a plain tensor; .*"
        r"set_optimizer_state_dict": {"exp_avg_sqs": lambda t: t},
        r"params\[0\] is a plain tensor but grads\[0\] is a DTensor": {"params": lambda t: t},
        r"params\[0\] is a DTensor with placements \(Partial\(sum\),\) .* a pending \(Partial\) "
        r"sum cannot be stepped": {
            "params": lambda t: DTensor.from_local(t, line, [Partial()]),
            "grads": lambda t: DTensor.from_local(t, line, [Partial()]),
            "exp_avgs": lambda t: DTensor.from_local(t, line, [Partial()]),
            "exp_avg_sqs": lambda t: DTensor.from_local(t, line, [Partial()]),
        },
        r"steps\[0\] is a DTensor with placements \(Shard\(dim=0\),\) .* one-element argument "
        r"must be a plain tensor or a Replicate DTensor": {
            "steps": lambda t: distribute_tensor(t.reshape(1).expand(2).clone(), line, [Shard(0)])
        },
    }
    for message, layout in cases.items():
        args = _adam_inputs(layout)
        before = _local_copies(args)
        with pytest.raises(RuntimeError, match=f"fastopt.adam_step_: {message}"):
            functional.adam_step_(*args, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
        for b, a in zip(before, _local_copies(args), strict=True):
            assert torch.equal(a, b), message

    # A sparse grad: DTensor has no sparse layouts, so a DTensor param cannot get one.
    param = distribute_tensor(torch.randn(10, 3, dtype=DTYPE), line, [Replicate()])
    grad = torch.sparse_coo_tensor(torch.tensor([[1, 4]]), torch.ones(2, 3, dtype=DTYPE), (10, 3))
    with pytest.raises(RuntimeError, match=r"grad is a sparse tensor, which DTensor cannot hold"):
        functional.sparse_adagrad_step_(
            param, grad, torch.zeros_like(param), torch.zeros(()), lr=0.1
        )

    # A fastopt optimizer given torch.optim-style full state (load_state_dict, not DCP's
    # set_optimizer_state_dict) says how to load it, and changes nothing.
    param = torch.nn.Parameter(distribute_tensor(torch.randn(6, 2, dtype=DTYPE), line, [Shard(0)]))
    param.grad = torch.ones_like(param)
    opt = fastopt.FusedAdam([param])
    full = {"step": torch.tensor(1.0), "exp_avg": torch.zeros(6, 2, dtype=DTYPE)}
    full["exp_avg_sq"] = torch.zeros(6, 2, dtype=DTYPE)
    opt.load_state_dict({"state": {0: full}, "param_groups": opt.state_dict()["param_groups"]})
    before = param.to_local().clone()
    with pytest.raises(RuntimeError, match="set_optimizer_state_dict"):
        opt.step()
    assert torch.equal(param.to_local(), before)
    assert opt.state[param]["step"].item() == 1.0


def ops_take_dtensors_directly() -> None:
    """torch.ops.fastopt.* (not only fastopt.functional) on DTensors, against the same call on
    the local tensors."""
    line = init_device_mesh("cpu", (2,))
    gen = torch.Generator().manual_seed(2)
    full = [torch.randn(5, 3, generator=gen, dtype=DTYPE).abs() for _ in range(3)]
    tensors = [distribute_tensor(t, line, [Shard(0)]) for t in full]
    local = [t.to_local().clone() for t in tensors]
    steps, local_steps = [torch.zeros(())], [torch.zeros(())]
    torch.ops.fastopt.adagrad_step_(
        tensors[:1], tensors[1:2], tensors[2:], steps, 0.1, None, 0.0, 0.0, 1e-10, False,
        None, None, [], None, 0.0, [],
    )  # fmt: skip
    torch.ops.fastopt.adagrad_step_(
        local[:1], local[1:2], local[2:], local_steps, 0.1, None, 0.0, 0.0, 1e-10, False,
        None, None, [], None, 0.0, [],
    )  # fmt: skip
    for t, expected in zip(tensors, local, strict=True):
        assert torch.equal(t.to_local(), expected)
    assert steps[0].item() == local_steps[0].item() == 1.0


def _replicated(t: torch.Tensor) -> DTensor:
    return distribute_tensor(t, init_device_mesh("cpu", (2,)), [Replicate()])


def compiled_before_any_eager_step() -> None:
    """The first fastopt step of the process is a compiled one: the DTensor rules get registered
    while torch.compile traces it."""
    assert not fastopt._dtensor._enabled
    functional_step_against_torch("Adam", compiled=True)


CHECKS = {
    "compiled-functional-Adam-first": compiled_before_any_eager_step,
    **{
        f"functional-{name}": functools.partial(functional_step_against_torch, name)
        for name in STEPS
    },
    "functional-Adam-tensor-lr": functools.partial(
        functional_step_against_torch, "Adam", torch.clone
    ),
    "functional-RMSprop-replicated-lr": functools.partial(
        functional_step_against_torch, "RMSprop", _replicated
    ),
    "refused-layouts": refused_layouts,
    "torch-ops-on-dtensors": ops_take_dtensors_directly,
}


outcomes, test_on_two_ranks = two_rank_tests(CHECKS)
