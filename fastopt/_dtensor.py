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

The exception is the total norm (fastopt::grad_norm, for clipping), which must cover every rank's
shards: each rank takes the norm of its local shards, and the ranks combine theirs (see
`_grad_norm_rule`).

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
_ONE_ELEMENT_ARGUMENTS = frozenset(
    {"steps", "step", "lr_tensor", "grad_scale", "found_inf", "grad_norm"}
)

_enabled = False
_DTensor: type = type(None)  # torch.distributed.tensor.DTensor once enable() has run


def enable() -> bool:
    """Registers the DTensor rules of fastopt's optimizer ops, once, if DTensor is loaded;
    returns whether they are registered."""
    global _enabled, _DTensor
    # torch.library.register_torch_dispatch and the public DTensor came with torch 2.5; with
    # torch 2.4 DTensors get torch's own error.
    if (
        not _enabled
        and _DTENSOR_MODULE in sys.modules
        and hasattr(torch.library, "register_torch_dispatch")
    ):
        from torch.distributed.tensor import DTensor

        from .functional import optim

        _DTensor = DTensor
        for name in optim.__all__:
            op = getattr(torch.ops.fastopt, name).default
            torch.library.register_torch_dispatch(op, DTensor, _local_step_rule(op))
        torch.library.register_torch_dispatch(
            torch.ops.fastopt.grad_norm.default, DTensor, _grad_norm_rule
        )
        _enabled = True
    return _enabled


# torch.compile runs enable() while tracing rather than tracing into it (registering is no graph
# op): what torch.compiler.assume_constant_result marks, set here without that call, which would
# import torch._dynamo with fastopt (about as long as importing torch itself).
enable._dynamo_marked_constant = True


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

        def where(name: str, i: int) -> str:  # for messages only
            return f"{name}[{i}]" if isinstance(values[name], list | tuple) else name

        params = _as_list(values[params_name])
        for i, p in enumerate(params):
            if isinstance(p, _DTensor) and any(x.is_partial() for x in p._spec.placements):
                raise _partial_param_error(op_name, where(params_name, i), p)
        for name in follow_params:
            # A list of another length (an option's empty list) is for the op's own checks.
            for i, (p, t) in enumerate(zip(params, _as_list(values[name]), strict=False)):
                if t is not None and not _laid_out_alike(t, p):  # None: a param with no master
                    raise _layout_error(op_name, where(name, i), t, where(params_name, i), p)
        for name in one_element:
            for i, t in enumerate(_as_list(values[name])):
                if isinstance(t, _DTensor) and not all(x.is_replicate() for x in t.placements):
                    raise _one_element_error(op_name, where(name, i), t)
        return func(*[_local(a) for a in args], **{k: _local(v) for k, v in kwargs.items()})

    return rule


def _laid_out_alike(t, p) -> bool:
    """Whether `t` and `p` are both plain tensors, or DTensors of one mesh and placements."""
    if isinstance(t, _DTensor) and isinstance(p, _DTensor):
        t_spec, p_spec = t._spec, p._spec
        return (t_spec.mesh is p_spec.mesh or t_spec.mesh == p_spec.mesh) and (
            t_spec.placements == p_spec.placements
        )
    return not isinstance(t, _DTensor) and not isinstance(p, _DTensor)


def _is_tensor_argument(schema_type) -> bool:
    while isinstance(schema_type, torch.OptionalType | torch.ListType):  # Tensor?[] too
        schema_type = schema_type.getElementType()
    return isinstance(schema_type, torch.TensorType)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _layout(t) -> str:
    return f"placements {tuple(t.placements)} on {t.device_mesh}"


def _partial_param_error(op: str, where: str, p) -> RuntimeError:
    return RuntimeError(
        f"{op}: {where} is a DTensor with {_layout(p)}: a pending (Partial) sum cannot be "
        "stepped elementwise; redistribute the param to Shard or Replicate placements first "
        "(param.redistribute(param.device_mesh, placements))"
    )


def _layout_error(op: str, where: str, t, param_where: str, p) -> RuntimeError:
    """Why `t` (a grad or state) is not laid out as its param `p`, and the fix."""
    if isinstance(p, _DTensor) and isinstance(t, _DTensor):
        return RuntimeError(
            f"{op}: {where} is a DTensor with {_layout(t)} but {param_where} has {_layout(p)}; "
            "each rank steps its local shards, which needs every grad and state laid out as its "
            "param: create the state with torch.zeros_like(param), or move it with "
            "tensor.redistribute(param.device_mesh, param.placements)"
        )
    if isinstance(p, _DTensor) and t.is_sparse:
        return RuntimeError(
            f"{op}: {param_where} is a DTensor ({_layout(p)}) but {where} is a sparse tensor, "
            "which DTensor cannot hold (torch.optim fails here too); give the param a dense grad "
            "(nn.Embedding(sparse=False)), or keep it out of DTensor: DDP takes sparse grads"
        )
    if isinstance(p, _DTensor):
        return RuntimeError(
            f"{op}: {param_where} is a DTensor ({_layout(p)}) but {where} is a plain tensor; "
            "pass DTensors laid out as their params: torch.zeros_like(param) creates one, and "
            "torch.distributed.checkpoint.state_dict.set_optimizer_state_dict loads optimizer "
            "state as one"
        )
    return RuntimeError(
        f"{op}: {param_where} is a plain tensor but {where} is a DTensor ({_layout(t)}); "
        "pass plain tensors with a plain param (DTensor.to_local() gives the local shard), "
        "or make the param a DTensor"
    )


def _one_element_error(op: str, where: str, t) -> RuntimeError:
    return RuntimeError(
        f"{op}: {where} is a DTensor with {_layout(t)}; a one-element argument must be a "
        "plain tensor or a Replicate DTensor: pass tensor.full_tensor()"
    )


def local_tensors(tensors: list) -> list:
    """`tensors` with each DTensor replaced by its local tensor (this rank's shard)."""
    return _local(tensors)


def _local(value):
    """`value` with each DTensor replaced by its local tensor (the rank's shard)."""
    if isinstance(value, list | tuple):
        return [v._local_tensor if isinstance(v, _DTensor) else v for v in value]
    return value._local_tensor if isinstance(value, _DTensor) else value


def _grad_norm_rule(cls, func, types, args, kwargs):
    """fastopt::grad_norm on DTensors: the norm of the full tensors, on every rank.

    The tensors go in groups of one mesh and one set of sharded mesh dimensions (plain tensors
    form a group of their own, held alike by every rank). Each group's local shards take one
    fused reduction; a sharded group's value (the sum of p-th powers, or the max for the
    inf-norm) is then combined across its sharded mesh dimensions by one collective: a DTensor
    Partial on those dimensions made Replicate. As torch's clip_grad_norm_ on DTensors, the result
    is a DTensor holding the norm on the tensors' mesh (Replicate), or a plain tensor where they
    span several meshes."""
    given = dict(zip(("tensors", "norm_type", "grad_scale"), args, strict=False)) | kwargs
    tensors, norm_type, grad_scale = given["tensors"], given["norm_type"], given["grad_scale"]
    op = "fastopt.grad_norm"
    if isinstance(grad_scale, _DTensor):
        if not all(x.is_replicate() for x in grad_scale.placements):
            raise _one_element_error(op, "grad_scale", grad_scale)
        grad_scale = grad_scale._local_tensor
    groups: dict[Any, list[torch.Tensor]] = {}
    for i, t in enumerate(tensors):
        if not isinstance(t, _DTensor):
            groups.setdefault(None, []).append(t)
            continue
        placements = t._spec.placements
        if any(x.is_partial() for x in placements):
            raise RuntimeError(
                f"{op}: tensors[{i}] is a DTensor with {_layout(t)}: a pending (Partial) sum has "
                "no norm of its own; redistribute it to Shard or Replicate placements first "
                "(tensor.redistribute(tensor.device_mesh, placements))"
            )
        sharded_dims = tuple(d for d, x in enumerate(placements) if x.is_shard())
        groups.setdefault((t._spec.mesh, sharded_dims), []).append(t._local_tensor)

    from torch.distributed.tensor import DTensor, Partial, Replicate

    keys = list(groups)
    if len(keys) <= 1 and (not keys or keys[0] is None or not keys[0][1]):
        # Held alike by every rank (plain or replicated tensors): nothing to combine.
        total = func(groups.get(keys[0], []) if keys else [], norm_type, grad_scale)
    else:
        inf = norm_type == float("inf")
        values = []  # each group's sum of p-th powers (or max), in float64
        for key, local_tensors in groups.items():
            norm = func(local_tensors, norm_type, grad_scale).double()
            value = norm if inf else norm.pow(norm_type)
            if key is not None and key[1]:
                mesh, sharded = key
                partial = Partial("max" if inf else "sum")
                placements = [partial if d in sharded else Replicate() for d in range(mesh.ndim)]
                value = DTensor.from_local(value, mesh, placements, run_check=False).full_tensor()
            values.append(value)
        stacked = torch.stack(values)
        total = stacked.amax() if inf else stacked.sum().pow(1.0 / norm_type)
        if not any(t.dtype == torch.float64 for t in tensors):
            total = total.float()  # the op's result dtype
    meshes = {key[0] for key in groups if key is not None}
    if len(meshes) != 1:
        return total
    mesh = meshes.pop()
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
