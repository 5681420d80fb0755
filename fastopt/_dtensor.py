"""fastopt's optimizer ops on DTensors (FSDP2's `fully_shard`, tensor parallel): each rank steps
its local shards, with no communication.

An optimizer step is elementwise: each element of a param is updated from the same element of
its grad and of its states. So the step of a DTensor is the step of its local tensor, provided
the grad and every state are laid out exactly as the param (same mesh, same placements), which is
what FSDP2 produces and what `torch.zeros_like(param)` creates. That is checked here, and any
mismatch is refused with the fix rather than redistributed: a redistribution would be
communication in the middle of an optimizer step, and an in-place op cannot move its param. The
one-element arguments (step counts, a tensor lr, GradScaler's grad_scale and found_inf) are plain
tensors or replicated DTensors. Params are checked one by one, so one call may hold plain tensors
(FSDP2's ignored params) and DTensors of different meshes (FSDP on a 1-d mesh beside FSDP + TP on
a 2-d one); a param with a Partial placement is refused, since a partial sum cannot be stepped.

How: a `torch.library.register_torch_dispatch` rule for DTensor on each op, which checks and then
calls the op on the local tensors; `torch.compile` traces through it, as through DTensor's own
dispatch. A DTensor sharding strategy (`torch.distributed.tensor.experimental.register_sharding`)
would lead to the same local call but does not fit: DTensor then redistributes mismatched args
instead of refusing them, refuses a shard layout whose dimension is shorter than the mesh (FSDP2
gives a 1-row param on 2 ranks an empty shard), and takes one mesh per call.

The rules are registered by `enable()`, lazily: importing torch.distributed.tensor costs about
half as much as importing torch itself, and no DTensor exists before it is imported.
`fastopt.functional` calls `enable()` before every op call that does not take its eager entry,
eager (a tensor subclass declines that entry) or traced. A program that calls `torch.ops.fastopt.*`
on DTensors directly, without fastopt.functional or an optimizer, calls `enable()` first.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

_DTENSOR_MODULE = "torch.distributed.tensor"

# The one-element arguments of the optimizer ops, by schema name. Every other tensor argument
# after the params (grads, states) is one tensor per param, laid out as its param.
_ONE_ELEMENT_ARGUMENTS = frozenset({"steps", "step", "lr_tensor", "grad_scale", "found_inf"})

_enabled = False


@torch.compiler.assume_constant_result  # traced: registers once, at trace time, not in the graph
def enable() -> bool:
    """Registers the DTensor rules of fastopt's optimizer ops, once, if DTensor is loaded;
    returns whether they are registered."""
    global _enabled
    if not _enabled and _DTENSOR_MODULE in sys.modules:
        from torch.distributed.tensor import DTensor

        from .functional import optim

        for name in optim.__all__:
            op = getattr(torch.ops.fastopt, name).default
            torch.library.register_torch_dispatch(op, DTensor, _local_step_rule(op))
        _enabled = True
    return _enabled


def _local_step_rule(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """The DTensor rule of optimizer op `op`, whose first argument is its param(s)."""
    arguments = op._schema.arguments
    names = [a.name for a in arguments]
    params_name = names[0]
    follow_params = [
        a.name
        for a in arguments[1:]
        if _is_tensor_argument(a.type) and a.name not in _ONE_ELEMENT_ARGUMENTS
    ]
    one_element = [a.name for a in arguments if a.name in _ONE_ELEMENT_ARGUMENTS]
    op_name = f"fastopt.{op._schema.name.split('::')[1]}"

    def rule(cls, func, types, args, kwargs):
        values = dict(zip(names, args, strict=False)) | kwargs  # args may omit defaults
        params = _as_list(values[params_name])
        for i, p in enumerate(params):
            _check_param(op_name, _indexed(params_name, i, values), p)
        for name in follow_params:
            # A list of another length (an option's empty list) is for the op's own checks.
            for i, (p, t) in enumerate(zip(params, _as_list(values[name]), strict=False)):
                _check_laid_out_as_param(
                    op_name, _indexed(name, i, values), t, _indexed(params_name, i, values), p
                )
        for name in one_element:
            for i, t in enumerate(_as_list(values[name])):
                _check_one_element(op_name, _indexed(name, i, values), t)
        return func(*(_local(a) for a in args), **{k: _local(v) for k, v in kwargs.items()})

    return rule


def _is_tensor_argument(schema_type) -> bool:
    if isinstance(schema_type, torch.OptionalType | torch.ListType):
        schema_type = schema_type.getElementType()
    return isinstance(schema_type, torch.TensorType)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _indexed(name: str, i: int, values: dict[str, Any]) -> str:
    """`name[i]` for a list argument, `name` for a single tensor."""
    return f"{name}[{i}]" if isinstance(values[name], list | tuple) else name


def _is_dtensor(t) -> bool:
    return isinstance(t, sys.modules[_DTENSOR_MODULE].DTensor)


def _layout(t) -> str:
    return f"placements {tuple(t.placements)} on {t.device_mesh}"


def _check_param(op: str, where: str, p) -> None:
    if _is_dtensor(p) and any(placement.is_partial() for placement in p.placements):
        raise RuntimeError(
            f"{op}: {where} is a DTensor with {_layout(p)}: a pending (Partial) sum cannot be "
            "stepped elementwise; redistribute the param to Shard or Replicate placements first "
            "(param.redistribute(param.device_mesh, placements))"
        )


def _check_laid_out_as_param(op: str, where: str, t, param_where: str, p) -> None:
    if _is_dtensor(p) and _is_dtensor(t):
        if t.device_mesh == p.device_mesh and tuple(t.placements) == tuple(p.placements):
            return
        raise RuntimeError(
            f"{op}: {where} is a DTensor with {_layout(t)} but {param_where} has {_layout(p)}; "
            "each rank steps its local shards, which needs every grad and state laid out as its "
            f"param: create the state with torch.zeros_like(param), or move it with "
            f"tensor.redistribute(param.device_mesh, param.placements)"
        )
    if _is_dtensor(p) and t.is_sparse:
        raise RuntimeError(
            f"{op}: {param_where} is a DTensor ({_layout(p)}) but {where} is a sparse tensor, "
            "which DTensor cannot hold (torch.optim fails here too); give the param a dense grad "
            "(nn.Embedding(sparse=False)), or keep it out of DTensor: DDP takes sparse grads"
        )
    if _is_dtensor(p):
        raise RuntimeError(
            f"{op}: {param_where} is a DTensor ({_layout(p)}) but {where} is a plain tensor; "
            "pass DTensors laid out as their params: torch.zeros_like(param) creates one, and "
            "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict loads optimizer "
            "state as one"
        )
    if _is_dtensor(t):
        raise RuntimeError(
            f"{op}: {param_where} is a plain tensor but {where} is a DTensor ({_layout(t)}); "
            "pass plain tensors with a plain param (DTensor.to_local() gives the local shard), "
            "or make the param a DTensor"
        )


def _check_one_element(op: str, where: str, t) -> None:
    if _is_dtensor(t) and not all(placement.is_replicate() for placement in t.placements):
        raise RuntimeError(
            f"{op}: {where} is a DTensor with {_layout(t)}; a one-element argument must be a "
            "plain tensor or a Replicate DTensor: pass tensor.full_tensor()"
        )


def _local(value):
    """`value` with each DTensor replaced by its local tensor (the rank's shard)."""
    if isinstance(value, list | tuple):
        return [_local(v) for v in value]
    return value._local_tensor if _is_dtensor(value) else value
