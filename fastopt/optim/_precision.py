"""The precision options every fastopt optimizer takes, and what they mean for its state.

- ``master_weights``: a float16/bfloat16 param gets a float32 master copy in its state
  (``"master_param"``), which the kernel updates and rounds into the param in the same pass; or,
  with ``master_weights="remainder"``, a bfloat16 param gets an int16 remainder
  (``"master_remainder"``) that together with the param holds the float32 master exactly.
- ``state_dtype``: the dtype of the moment estimates (float32, or bfloat16 rounded
  stochastically with a per-param seed kept in the state as ``"rounding_seed"``).
- ``max_grad_norm``, ``norm_type``: the grads of the param groups that clip (all, when the
  constructor gives it) are clipped by their total norm inside the step, as
  ``torch.nn.utils.clip_grad_norm_`` would clip them first.

Each option that is not at its default is kept in every param group, so a state_dict records it
and a group may differ; an optimizer with none of them has torch.optim's exact state_dict format.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import _dtensor

_HALF_DTYPES = (torch.float16, torch.bfloat16)
_STATE_DTYPES = (torch.float32, torch.bfloat16)
MASTER_KEYS = ("master_param", "master_remainder")
SEED_KEY = "rounding_seed"
GROUP_DEFAULTS: dict[str, Any] = {
    "master_weights": False,
    "state_dtype": None,
    "max_grad_norm": None,
    "norm_type": 2.0,
}


@dataclass(frozen=True)
class PrecisionOptions:
    """The precision options of one optimizer, as its constructor received them."""

    master_weights: bool | str = False
    state_dtype: torch.dtype | None = None
    max_grad_norm: float | None = None
    norm_type: float = 2.0

    def check(self, name: str) -> None:
        """Raises ValueError naming the bad option and what it accepts."""
        if self.master_weights not in (False, True, "remainder"):
            raise ValueError(
                f"{name}: master_weights must be False, True (a float32 master copy of each "
                "float16/bfloat16 param) or 'remainder' (bfloat16 params: a 16-bit remainder "
                f"that holds the float32 master exactly), got {self.master_weights!r}"
            )
        if self.state_dtype is not None and self.state_dtype not in _STATE_DTYPES:
            raise ValueError(
                f"{name}: state_dtype must be None (the param's dtype, or float32 with master "
                f"weights), torch.float32 or torch.bfloat16, got {self.state_dtype!r}"
            )
        if self.max_grad_norm is not None and not (
            isinstance(self.max_grad_norm, int | float) and 0 < self.max_grad_norm < math.inf
        ):
            raise ValueError(
                f"{name}: max_grad_norm must be a positive finite number (or None: no "
                f"clipping), got {self.max_grad_norm!r}"
            )
        if not (isinstance(self.norm_type, int | float) and self.norm_type > 0):
            raise ValueError(
                f"{name}: norm_type must be a positive number or inf, got {self.norm_type!r}"
            )

    def group_entries(self) -> dict[str, Any]:
        """The options that differ from the defaults: an optimizer that uses none keeps
        exactly torch.optim's param_group keys (and state_dict format)."""
        entries = {
            "master_weights": self.master_weights,
            "state_dtype": self.state_dtype,
            "max_grad_norm": None if self.max_grad_norm is None else float(self.max_grad_norm),
            "norm_type": float(self.norm_type),
        }
        return {k: v for k, v in entries.items() if v != GROUP_DEFAULTS[k]}


def option(group: dict[str, Any], key: str) -> Any:
    """A precision option of a param group (which records only those not at their default)."""
    return group.get(key, GROUP_DEFAULTS[key])


PRECISION_DOC = """\
        master_weights: ``True`` keeps a float32 master copy of each float16/bfloat16 param
            in the state: the step updates the master and writes it, rounded to nearest, into
            the param. ``"remainder"`` does the same for bfloat16 params with a 16-bit remainder
            instead (param and remainder hold the float32 master exactly: 2 bytes per param
            instead of 4). Default False: params are updated in their own dtype.
        state_dtype: the dtype of the state tensors: ``None`` (the param's dtype, or float32
            with master weights), ``torch.float32``, or ``torch.bfloat16`` (stored with
            stochastic rounding, whose seed is drawn from torch's generator and kept in the
            state, so runs and resumed checkpoints are reproducible). float64 params keep
            float64 state; float16 params take bfloat16 state only with master weights.
        max_grad_norm: clip the grads of all param groups by their total norm inside the step,
            as ``torch.nn.utils.clip_grad_norm_(params, max_grad_norm, norm_type)`` before the
            step would (the grads themselves are left as they are); ``step()`` then returns the
            norm before clipping. Default None: no clipping. A param group may give its own
            (None: that group is not clipped): the norm is then over the grads of the groups
            that clip, each clipped by its own ``max_grad_norm``.
        norm_type: the norm of ``max_grad_norm``: 2.0 (default), ``inf``, or another p > 0."""


def documented(cls: type) -> type:
    """Adds the precision options to the Args of an optimizer class's docstring (which lists
    them before its example)."""
    doc = cls.__doc__ or ""
    if "Args:" in doc and "\n\n    Example::" in doc:
        cls.__doc__ = doc.replace("\n\n    Example::", f"\n{PRECISION_DOC}\n\n    Example::", 1)
    return cls


def has_master(p: Tensor, group: dict[str, Any]) -> bool:
    return bool(option(group, "master_weights")) and p.dtype in _HALF_DTYPES


def master_key(p: Tensor, group: dict[str, Any]) -> str:
    remainder = option(group, "master_weights") == "remainder" and p.dtype == torch.bfloat16
    return "master_remainder" if remainder else "master_param"


def state_dtype(p: Tensor, group: dict[str, Any]) -> torch.dtype:
    """The dtype of `p`'s state tensors under the group's options."""
    wanted = option(group, "state_dtype")
    if p.dtype == torch.float64:
        return p.dtype
    if wanted is None:
        return torch.float32 if has_master(p, group) else p.dtype
    return wanted


def is_plain(group: dict[str, Any]) -> bool:
    """Whether the group keeps no master copies and state in the params' dtypes."""
    return not option(group, "master_weights") and option(group, "state_dtype") is None


def complete_state(p: Tensor, group: dict[str, Any], state: dict[str, Any]):
    """Adds what the group's options need to `p`'s state (its master copy, its rounding seed);
    returns them (None where there is none)."""
    master = None
    if has_master(p, group):
        key = master_key(p, group)
        if key not in state:
            if key == "master_remainder":  # the param is the master exactly: remainder 0
                state[key] = torch.zeros_like(p, dtype=torch.int16)
            else:
                state[key] = p.detach().to(torch.float32, copy=True)
        master = state[key]
        if master.dtype == torch.bfloat16 and key == "master_remainder":
            # A remainder as a state_dict holds it (`saveable`), put in place by code that
            # bypasses load_state_dict (ZeroRedundancyOptimizer does).
            state[key] = master = master.view(torch.int16)
    seed = None
    if option(group, "state_dtype") == torch.bfloat16:
        if SEED_KEY not in state:
            state[SEED_KEY] = _new_seed()
        seed = state[SEED_KEY]
    return master, seed


def _new_seed() -> int:
    """A rounding seed drawn from torch's generator."""
    return int(torch.randint(0, 2**62, ()).item())


# A step compiled before the state exists draws its seeds while tracing, as constants of the
# graph: traced, the draw would be a data-dependent int (`.item()`), which the op's int[] argument
# cannot take. What torch.compiler.assume_constant_result marks, set without importing torch._dynamo
# (as for fastopt._dtensor.enable).
_new_seed._dynamo_marked_constant = True


def step_arguments(group, states, grad_norm: Tensor | None, device) -> dict[str, Any]:
    """The functional step's precision arguments for one group."""
    masters = states["master"]
    arguments: dict[str, Any] = {
        "masters": list(masters) if any(m is not None for m in masters) else [],
        "rounding_seeds": list(states[SEED_KEY])
        if option(group, "state_dtype") == torch.bfloat16
        else [],
    }
    if grad_norm is not None and clips(group):
        arguments["grad_norm"] = grad_norm.to(device, non_blocking=True)
        arguments["max_grad_norm"] = option(group, "max_grad_norm")
    return arguments


def clips(group) -> bool:
    """Whether this param group's grads are clipped (and count in the total norm)."""
    return option(group, "max_grad_norm") is not None


def clipping(param_groups, name: str) -> float | None:
    """The norm type to clip by, or None if no group clips."""
    norm_types = {option(g, "norm_type") for g in param_groups if clips(g)}
    if len(norm_types) > 1:
        raise ValueError(
            f"{name}: param groups clip by different norm_type values {sorted(norm_types)}; the "
            "grads are clipped by one total norm over all groups, so give them one norm_type"
        )
    return norm_types.pop() if norm_types else None


def restore_state_dtypes(state: dict[str, Any], saved: dict[str, Any], p: Tensor, group) -> bool:
    """After torch.optim's load_state_dict cast every float state tensor to `p`'s dtype: `p`'s
    state as saved, converted to the dtypes the group's options give it, laid out as `p`. A
    master copy the options do not use (or use in another form) is dropped, and remade from the
    param; so is a float32 master copy that does not round to the param, which is no master of
    it. Returns whether such a master copy was dropped."""
    stale = False
    for key, value in saved.items():
        if key == "step" or not isinstance(value, Tensor):
            continue
        if key in MASTER_KEYS:
            if key == "master_param" and not _rounds_to(value, p):
                stale = True
                state.pop(key, None)
            elif has_master(p, group) and key == master_key(p, group):
                if key == "master_remainder":  # saved as bfloat16 bits (`saveable`), or int16
                    value = value.view(torch.int16)
                state[key] = _laid_out_as(p, value, value.dtype)
            else:
                state.pop(key, None)
        elif value.is_floating_point() and value.shape == p.shape:
            dtype = state_dtype(p, group)
            if state[key].dtype != dtype:
                state[key] = _laid_out_as(p, value, dtype)
    return stale


def _rounds_to(master: Tensor, p: Tensor) -> bool:
    """Whether float32 `master` rounds to `p`, as the step leaves a master copy and its param,
    compared on this rank's shards (no communication)."""
    if master.dtype != torch.float32 or master.shape != p.shape:
        return False
    _dtensor.enable()  # what local_tensors knows DTensor by
    master, p = _dtensor.local_tensors([master, p])
    return torch.equal(master.to(device=p.device, dtype=p.dtype), p)


def saveable(state_dict: dict[str, Any]) -> dict[str, Any]:
    """`state_dict` (torch.optim's, of a fastopt optimizer) in the value types that
    torch.distributed.checkpoint and every collective take, which `load_state_dict` reads back:
    a param group's ``state_dtype`` by name (``"torch.bfloat16"``: DCP's full state dicts take
    no torch.dtype), and each ``"master_remainder"``'s int16 bits viewed as bfloat16 (gathering
    a full state dict needs a collective, and neither gloo nor NCCL moves int16)."""
    for group in state_dict["param_groups"]:  # copies of the optimizer's groups
        if isinstance(group.get("state_dtype"), torch.dtype):
            group["state_dtype"] = str(group["state_dtype"])
    state_dict["state"] = {
        i: s | {"master_remainder": s["master_remainder"].view(torch.bfloat16)}
        if "master_remainder" in s
        else s
        for i, s in state_dict["state"].items()
    }
    return state_dict


def state_dtype_of_saved(value: Any) -> Any:
    """A param group's ``state_dtype`` as `saveable` wrote it (or as it was): the torch.dtype."""
    if isinstance(value, str) and value.startswith("torch."):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return value


def _laid_out_as(p: Tensor, value: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.empty_like(p, dtype=dtype).copy_(value)


def to_torch_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A fastopt optimizer's state_dict without fastopt's own entries (master copies, rounding
    seeds, the precision options of each param group), for a torch.optim optimizer.

    torch.optim loads a fastopt state_dict as it is too, ignoring those entries; this makes the
    loss explicit: torch.optim then continues from the 16-bit params, and warns when master
    copies are dropped.

    Example::

        >>> import warnings, torch, fastopt
        >>> model = torch.nn.Linear(4, 2).bfloat16()
        >>> opt = fastopt.FusedAdamW(model.parameters(), master_weights=True)
        >>> model(torch.randn(8, 4).bfloat16()).float().sum().backward()
        >>> opt.step()
        >>> with warnings.catch_warnings(record=True):  # "dropping the float32 master copies"
        ...     state_dict = fastopt.optim.to_torch_state_dict(opt.state_dict())
        >>> torch.optim.AdamW(model.parameters()).load_state_dict(state_dict)
    """
    own = (*MASTER_KEYS, SEED_KEY)
    state = {
        i: {k: v for k, v in s.items() if k not in own} for i, s in state_dict["state"].items()
    }
    if any(k in MASTER_KEYS for s in state_dict["state"].values() for k in s):
        warnings.warn(
            "fastopt.optim.to_torch_state_dict: dropping the float32 master copies of 16-bit "
            "params; torch.optim continues from the params as they are (rounded)",
            UserWarning,
            stacklevel=2,
        )
    groups = [
        {k: v for k, v in g.items() if k not in GROUP_DEFAULTS} for g in state_dict["param_groups"]
    ]
    return {"state": state, "param_groups": groups}
