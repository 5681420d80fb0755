"""What every fastopt optimizer shares: torch.optim compatibility and checked inputs.

A subclass names its per-param state tensors (and may say how to create them), and implements
`_group_step` with calls into `fastopt.functional`; everything else is here:
- the state_dict has torch's format, so checkpoints move to and from torch.optim both ways;
- `torch.amp.GradScaler` hands over `grad_scale` / `found_inf` (the contract torch's fused
  optimizers use) and unscaling happens inside the kernel;
- every param of every group is checked before anything (params, state, step counts) changes;
- the precision options every optimizer takes (`fastopt.optim._precision`): master copies of
  16-bit params, the dtype of the state, and clipping by the global grad norm inside the step.
"""

from __future__ import annotations

import operator
import re
import warnings
from typing import Any

import torch
from torch import Tensor

from .. import _extension
from ..clip import grad_total_norm
from . import _precision
from ._precision import PrecisionOptions

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF = (torch.float16, torch.bfloat16)


class FusedOptimizer(torch.optim.Optimizer):
    """Base of fastopt's optimizers; see the module docstring."""

    # GradScaler calls step() directly, with `grad_scale` and `found_inf` set on the optimizer.
    _step_supports_amp_scaling = True
    # Whether `_group_step` takes sparse COO grads (the checks refuse them otherwise).
    _supports_sparse_grads = False
    # param_group keys that checkpoints of older torch versions may lack, with the value torch's
    # own __setstate__ gives them.
    _keys_added_later: dict[str, Any] = {}

    def __init__(
        self, params, defaults: dict[str, Any], precision: PrecisionOptions | None = None
    ) -> None:
        if defaults.get("differentiable"):
            raise ValueError(
                f"{type(self).__name__} does not support differentiable=True (its kernels do not "
                "record autograd history); use the torch.optim optimizer for that"
            )
        _check_lr(defaults["lr"])
        precision = precision or PrecisionOptions()
        precision.check(type(self).__name__)
        # Kept in every param group where not at their defaults (so a group may differ, and a
        # state_dict records them).
        super().__init__(params, defaults | precision.group_entries())
        # The pre-clip total grad norm of the last step with clipping, a 0-dim tensor.
        self.grad_norm: Tensor | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a param group, as torch.optim does; checks the precision options it gives
        (as the constructor checks its own), refuses ``master_weights`` for a group with no
        float16/bfloat16 param, which has nothing to keep a master copy of, and bfloat16 state
        for float16 params without master copies, which the kernels do not take."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        name, index = type(self).__name__, len(self.param_groups) - 1
        try:
            options = {k: _precision.option(group, k) for k in _precision.GROUP_DEFAULTS}
            PrecisionOptions(**options).check(f"{name}: param_groups[{index}]")
            master_weights = options["master_weights"]
            if master_weights and not any(p.dtype in _HALF for p in group["params"]):
                dtypes = sorted({str(p.dtype) for p in group["params"]})
                raise ValueError(
                    f"{name}: master_weights={master_weights!r} but param_groups[{index}] has no "
                    f"float16 or bfloat16 param (its dtypes: {', '.join(dtypes)}); master copies "
                    "are for 16-bit params: convert the model first (model.bfloat16()), or drop "
                    "master_weights"
                )
            half_params = any(p.dtype == torch.float16 for p in group["params"])
            if options["state_dtype"] == torch.bfloat16 and half_params and not master_weights:
                raise ValueError(
                    f"{name}: state_dtype=torch.bfloat16 but param_groups[{index}] has float16 "
                    "params and no master copies; bfloat16 state is for float32 and bfloat16 "
                    "params, or float16 ones with master_weights=True: add master_weights=True, "
                    "or put the float16 params in a group without state_dtype"
                )
        except ValueError:
            self.param_groups.pop()
            raise

    # -- what a subclass provides -------------------------------------------------------------

    def _state_keys(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The per-element state tensors of a param in `group`, besides `step`."""
        raise NotImplementedError

    def _new_state(self, p: Tensor, group: dict[str, Any], key: str) -> Tensor:
        """The state tensor `key` of `p` when it is created: zeros, as torch.optim creates most,
        in the dtype the group's precision options give it."""
        return torch.zeros_like(
            p, dtype=_precision.state_dtype(p, group), memory_format=torch.preserve_format
        )

    def _group_step(self, group, params, grads, states, shared: dict[str, Any]) -> None:
        """Updates `params` (all with a grad, all on one device) and their state in place;
        `states[key]` holds the params' state tensors of that key, in the params' order, and
        `shared` the keyword arguments every functional step takes (grad_scale, found_inf,
        masters, grad_norm, max_grad_norm, rounding_seeds)."""
        raise NotImplementedError

    # -- the shared machinery ------------------------------------------------------------------

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self._keys_added_later.items():
                group.setdefault(key, value)
            # A checkpoint of torch.optim (or of an older fastopt) has no precision options:
            # the group takes this optimizer's own.
            for key in _precision.GROUP_DEFAULTS:
                if key in self.defaults:
                    group.setdefault(key, self.defaults[key])
            if "state_dtype" in group:
                group["state_dtype"] = _precision.state_dtype_of_saved(group["state_dtype"])
        # A checkpoint may come from torch.optim with its step counts on the CPU (or, from old
        # torch versions, as Python numbers), and from a model whose params had another memory
        # layout (contiguous, then channels_last); the kernels read the counts on the param's
        # device and walk each state tensor in its param's layout.
        for group in self.param_groups:
            for p in group["params"]:
                p_state = self.state.get(p)
                if not p_state:
                    continue
                for key, value in p_state.items():
                    if key == "step":
                        p_state[key] = _step_tensor(value, p.device)
                    elif (
                        isinstance(value, Tensor)
                        and value.shape == p.shape
                        and value.stride() != p.stride()
                    ):
                        # The kernels also take strides that differ in dimensions of size 1
                        # (csrc/optim/optimizer_checks.h); the param's exact layout is simpler.
                        p_state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state_dict, with fastopt's entries in the value types that
        ``torch.distributed.checkpoint`` and its collectives take: a param group's
        ``state_dtype`` by name (``"torch.bfloat16"``), and each ``"master_remainder"``'s int16
        bits viewed as bfloat16. ``load_state_dict`` reads both back."""
        return _precision.saveable(super().state_dict())

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step over every param that has a grad.

        Args:
            closure: re-evaluates the model and returns the loss (optional).

        Returns:
            The closure's loss, as torch.optim returns it; without a closure, when the grads
            are clipped (``max_grad_norm``), their total norm before clipping (a 0-dim tensor on
            the params' device, also kept as ``self.grad_norm``), else None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = _AmpTensors(getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        work = []
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                params = [p for p, g in zip(params, grads, strict=True) if g is not None]
                grads = [g for g in grads if g is not None]
            if params:
                work.append((index, group, params, grads))
        created: list[Tensor] = []
        current = None
        try:
            clipping = _precision.clipping(self.param_groups, type(self).__name__)
            grad_norm = None
            # The total norm of the grads of the groups that clip (a group may set
            # max_grad_norm=None), as clip_grad_norm_ over their params would take it.
            clipped = [g for _, group, _, grads in work if _precision.clips(group) for g in grads]
            if clipping is not None and clipped:
                grad_scale = amp.grad_scale(clipped[0].device)
                grad_norm = grad_total_norm(clipped, clipping, grad_scale)
            prepared = []
            for current in work:
                _, group, params, _ = current
                states, created_now = self._states_of(params, group)
                created += created_now
                prepared.append((current, states))
            # The op checks all of its inputs before it changes anything, so a bad first group
            # fails cleanly; a bad later group would fail after earlier ones had stepped. So the
            # later groups go through the op first as a skipped step (found_inf set), which
            # checks everything and changes nothing. (A compiled step checks while tracing.)
            checks = [] if torch.compiler.is_compiling() else prepared[1:]
            runs = [(item, True) for item in checks] + [(item, False) for item in prepared]
            for (current, states), check_only in runs:
                index, group, params, grads = current
                device = params[0].device
                found_inf = self._skip_flag(device) if check_only else amp.found_inf(device)
                shared = {"grad_scale": amp.grad_scale(device), "found_inf": found_inf}
                shared |= _precision.step_arguments(group, states, grad_norm, device)
                self._group_step(group, params, grads, states, shared)
        except Exception as error:
            for p in created:  # leave no trace of a failed step
                del self.state[p]
            if current is None:
                raise
            # Re-raise naming the param group, the param and the fix, where the check below
            # finds the cause; otherwise the op's own message, with the param group it names.
            self._check_group(*current)
            in_context = self._in_group_context(error, *current)
            if in_context is error:
                raise
            raise in_context from error
        if grad_norm is not None:
            self.grad_norm = grad_norm
        return loss if closure is not None else grad_norm

    def _where(self, index: int, group, p: Tensor) -> str:
        """`p` as users know it: its place in `param_groups`, which also holds params without
        a grad."""
        i = next(j for j, q in enumerate(group["params"]) if q is p)
        return f"{type(self).__name__}: param {i} of param_groups[{index}] (shape {tuple(p.shape)})"

    def _in_group_context(self, error: Exception, index: int, group, params, grads) -> Exception:
        """The op's error about its `name[i]` argument (`grads[2] has strides ...`) said of the
        param it concerns; other errors as they are."""
        found = re.search(r"\w\[(\d+)\]", str(error))
        if not isinstance(error, RuntimeError) or found is None or int(found[1]) >= len(params):
            return error
        return RuntimeError(f"{self._where(index, group, params[int(found[1])])}: {error}")

    def _skip_flag(self, device: torch.device) -> Tensor:
        """A found_inf that is set, on `device`; kept, so that steps after the first (those a
        CUDA graph captures) make no copy. Created in a graph capture, it would only be recorded,
        never filled: so the first step must not be captured."""
        flags = self.__dict__.setdefault("_skip_flags", {})
        if device not in flags:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"{type(self).__name__}: the first step on {device} of an optimizer with "
                    "several param groups is being captured in a CUDA graph, which would leave "
                    "its tensors unfilled; take one step before capturing (a warm-up on a side "
                    "stream, as torch.cuda.graphs asks)"
                )
            flags[device] = torch.ones((), dtype=torch.float32, device=device)
        return flags[device]

    def _check_group(self, index: int, group, params: list[Tensor], grads: list[Tensor]) -> None:
        name = type(self).__name__
        if not params:
            return
        device = params[0].device
        _extension.require_kernels(device, name)

        def where(p: Tensor) -> str:
            return self._where(index, group, p)

        for p, g in zip(params, grads, strict=True):
            sparse = g.is_sparse and self._supports_sparse_grads
            if g.layout != torch.strided and not sparse:
                raise RuntimeError(
                    f"{where(p)} has a {g.layout} gradient, which {name} does not support; use "
                    "a dense gradient (e.g. nn.Embedding(sparse=False)), or an optimizer for "
                    "sparse gradients (fastopt.FusedAdagrad, torch.optim.SparseAdam)"
                )
            if sparse and not p.is_contiguous():
                raise RuntimeError(
                    f"{where(p)} has a sparse gradient but is not contiguous; {name}'s sparse "
                    "row update needs a contiguous param: use `p.data = p.data.contiguous()`"
                )
            if p.is_complex():
                raise RuntimeError(
                    f"{where(p)} is complex, which {name} does not support; optimize "
                    "torch.view_as_real(param) instead"
                )
            if p.dtype not in _FLOAT_DTYPES:
                raise RuntimeError(
                    f"{where(p)} has dtype {p.dtype}; supported are float32, float64, float16 and "
                    "bfloat16"
                )
            if p.device != device:
                raise RuntimeError(
                    f"{where(p)} is on {p.device} but param 0 of that group is on {device}; a "
                    "fastopt param group holds params of one device: put the others in a group "
                    "of their own"
                )
            if g.device != p.device or g.dtype != p.dtype or g.shape != p.shape:
                raise RuntimeError(
                    f"{where(p)} has a grad of {g.dtype} {tuple(g.shape)} on {g.device}; it must "
                    f"match the param: {p.dtype} {tuple(p.shape)} on {p.device}"
                )
            if not _is_dense(p):
                raise RuntimeError(
                    f"{where(p)} is not stored densely (a strided view of a larger tensor?); "
                    "fastopt's kernels need dense params: use `p.data = p.data.contiguous()`"
                )
        lr = group["lr"]
        if isinstance(lr, Tensor) and not (lr.device.type == "cpu" or lr.device == device):
            raise RuntimeError(
                f"{name}: param_groups[{index}]['lr'] is a tensor on {lr.device} but the "
                f"params are on {device}; keep it on the CPU or on {device}"
            )

    def _states_of(self, params: list[Tensor], group: dict[str, Any]):
        """The state of the params as one tuple per key ("step", the keys of `_state_keys`, and
        the precision keys: "master" (a tensor or None) and "rounding_seed" (an int or None)),
        created as torch.optim creates it on first use; and the params whose state was created
        now."""
        keys = self._state_keys(group)
        columns = operator.itemgetter("step", *keys)
        plain = _precision.is_plain(group)
        if plain:
            # Every step after the first: each state complete (a plain group's has exactly these
            # keys). Gathered with C-level loops (map, zip): per param, Python bytecode costs
            # more than the lookups themselves on a model of thousands of small params.
            found = list(map(self.state.__getitem__, params))
            if set(map(len, found)) == {len(keys) + 1}:
                states = {k: tuple(map(operator.itemgetter(k), found)) for k in ("step", *keys)}
                none = (None,) * len(params)
                return states | {"master": none, _precision.SEED_KEY: none}, []
        rows, masters, seeds, created = [], [], [], []
        for p in params:
            state = self.state[p]
            # A plain group's complete state has exactly these keys: the check is one len().
            if not plain or len(state) != len(keys) + 1:
                if not state:
                    created.append(p)
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                for key in keys:  # all of them when new; some when amsgrad was switched on since
                    if key not in state:
                        state[key] = self._new_state(p, group, key)
            if plain:
                masters.append(None)
                seeds.append(None)
            else:
                master, seed = _precision.complete_state(p, group, state)
                masters.append(master)
                seeds.append(seed)
            rows.append(columns(state))
        states = dict(zip(("step", *keys), zip(*rows, strict=True), strict=True))
        return states | {"master": tuple(masters), _precision.SEED_KEY: tuple(seeds)}, created

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state_dict of this optimizer or of its torch.optim counterpart.

        torch.optim casts every floating-point state tensor to its param's dtype; the state a
        fastopt optimizer keeps in another dtype (master copies, float32 or bfloat16 state) is
        loaded as it was saved instead, and converted to the dtype the param group's options
        give it. Master copies missing from the state_dict (one saved by torch.optim) are made
        from the params at the next step; so are those that do not round to their params
        (torch.optim carries them along cast to the params' dtype, and its steps leave them
        behind), with a warning.
        """
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = (i for g in state_dict["param_groups"] for i in g["params"])
        params = (p for g in self.param_groups for p in g["params"])
        groups = (g for g in self.param_groups for _ in g["params"])
        stale = False
        for saved_id, p, group in zip(saved_ids, params, groups, strict=True):
            if saved_id in saved and p in self.state:
                stale |= _precision.restore_state_dtypes(self.state[p], saved[saved_id], p, group)
        if stale:
            warnings.warn(
                f"{type(self).__name__}.load_state_dict: the state_dict holds float32 master "
                "copies that do not round to their params (torch.optim saves them cast to the "
                "params' dtype and left behind by its steps; a torch.distributed.checkpoint "
                "template keeps those of the fresh params where the checkpoint has none); they "
                "are dropped and made again from the params at the next step",
                UserWarning,
                stacklevel=2,
            )


class _AmpTensors:
    """GradScaler's grad_scale and found_inf, on the device of each param group: GradScaler keeps
    them on its own device, and a model may span several (torch's fused Adam moves them too)."""

    def __init__(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        self._grad_scale = grad_scale
        self._found_inf = found_inf
        self._copies: dict[tuple[str, torch.device], Tensor] = {}

    def _on(self, name: str, t: Tensor | None, device: torch.device) -> Tensor | None:
        if t is None or t.device == device:
            return t
        key = (name, device)
        if key not in self._copies:
            self._copies[key] = t.to(device, non_blocking=True)
        return self._copies[key]

    def grad_scale(self, device: torch.device) -> Tensor | None:
        return self._on("grad_scale", self._grad_scale, device)

    def found_inf(self, device: torch.device) -> Tensor | None:
        return self._on("found_inf", self._found_inf, device)


def _is_dense(t: Tensor) -> bool:
    """Whether `t`'s elements fill its storage span exactly once, in any dimension order (what
    the kernels need to treat it as a flat array)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride(), strict=True), key=lambda d: d[1]):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def _step_tensor(step, device: torch.device) -> Tensor:
    if isinstance(step, Tensor):
        return step.to(device=device, dtype=torch.float32)
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def _check_lr(lr) -> None:
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
