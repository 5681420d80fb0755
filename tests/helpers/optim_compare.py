"""fastopt's optimizer against torch's, step by step: params, which params have state and with
which keys, every state tensor and the step counts."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from helpers.optim_pairs import set_grads
from helpers.snapshot import assert_unchanged, snapshot
from helpers.tolerances import FP32

# The per-element state (besides `step`) torch.optim keeps for a param, by optimizer, as a
# function of the optimizer's arguments, in torch's order.
_STATE_KEYS: dict[str, Callable[[dict], list[str]]] = {
    "Adam": lambda o: ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if o.get("amsgrad") else []),
    "AdamW": lambda o: _STATE_KEYS["Adam"](o),
    "RMSprop": lambda o: (
        ["square_avg"]
        + (["momentum_buffer"] if o.get("momentum", 0) > 0 else [])
        + (["grad_avg"] if o.get("centered") else [])
    ),
    "Adagrad": lambda o: ["sum"],
    "Adadelta": lambda o: ["square_avg", "acc_delta"],
}


def state_keys(name: str, options: dict) -> list[str]:
    """The per-element state keys of torch.optim.`name` with keyword arguments `options`."""
    return _STATE_KEYS[name](options)


def assert_state_format(opt: torch.optim.Optimizer, p: Tensor, keys: Sequence[str]) -> None:
    """The state of `p` has exactly `step` and `keys` (see `state_keys`), a float32 0-dim step,
    and per-element state in the param's dtype, device and layout."""
    state = opt.state[p]
    assert set(state) == {"step", *keys}
    step = state["step"]
    assert isinstance(step, Tensor) and step.dtype == torch.float32 and step.dim() == 0
    for key in keys:
        t = state[key]
        assert (t.dtype, t.device, t.shape) == (p.dtype, p.device, p.shape), key
        if p.numel() > 1:
            assert t.stride() == p.stride(), key


def _scaled_atol(atol: float, tensors: Sequence[Tensor]) -> float:
    """`atol` scaled by the largest finite magnitude among `tensors` (kept as is where all are
    0): the absolute error that cancellation leaves is the rounding of the operands, which are
    of the quantity's magnitude (RMSprop's momentum_buffer reaches ~1/sqrt(1 - alpha) / (1 -
    momentum), exp_avg_sq ~1e-3 * grad**2)."""
    scale = 0.0
    for t in tensors:
        finite = t[t.isfinite()]
        if finite.numel():
            scale = max(scale, finite.abs().max().item())
    return atol * scale if scale > 0 else atol


def _assert_same_steps(entries: Sequence[tuple[int, Tensor, Tensor]], where: str) -> None:
    """fastopt's step counts are float32 0-dim tensors equal to torch's. Gathered on the CPU in
    one comparison: thousands of per-param `.item()` calls would dominate a large test."""
    for i, _, f in entries:
        assert f.dtype == torch.float32 and f.dim() == 0, f"{where} param {i}: step"
    ref_steps = torch.stack([r.to("cpu", torch.float64) for _, r, _ in entries])
    fast_steps = torch.stack([f.to("cpu", torch.float64) for _, _, f in entries])
    differing = (fast_steps != ref_steps).nonzero().flatten().tolist()
    assert not differing, f"{where}: step of params {[entries[i][0] for i in differing]}"


def assert_matches_reference(
    ref_opt: torch.optim.Optimizer,
    fast_opt: torch.optim.Optimizer,
    ref_params: Sequence[Tensor],
    fast_params: Sequence[Tensor],
    rtol: float,
    atol: float,
    where: str = "",
    *,
    flat: bool = False,
    noise: dict[str, float] | None = None,
) -> None:
    """Params (dtype, shape, strides and values), which params have state and with which keys,
    every state tensor, and the exact step counts agree with the reference.

    `atol` only guards elements near zero (where cancellation, e.g. in exp_avg's lerp, leaves
    an absolute error of the operands' rounding): it is scaled by the largest magnitude of that
    quantity over all params (see `_scaled_atol`).

    `noise` (per quantity): how far torch's own rounding took it from exact (fp64) arithmetic
    on this trajectory (see `step_and_compare`); fastopt may differ from torch by twice that.
    It covers cancellation upstream of a quantity, e.g. in grad + weight_decay * param, whose
    rounding a square (Adadelta's acc_delta) turns into a relative error beyond rtol.

    `flat` compares the values of each quantity once, over all params concatenated, instead of
    param by param: for thousands of params, where one comparison per tensor would dominate.
    """
    # Per quantity ("param", "exp_avg", ...): (index of the param, torch's value, fastopt's).
    entries: dict[str, list[tuple[int, Tensor, Tensor]]] = {"param": []}
    for i, (r, f) in enumerate(zip(ref_params, fast_params, strict=True)):
        label = f"{where} param {i} {tuple(r.shape)}"
        assert f.dtype == r.dtype and f.shape == r.shape and f.stride() == r.stride(), label
        entries["param"].append((i, r.detach(), f.detach()))
        assert (f in fast_opt.state) == (r in ref_opt.state), label
        r_state, f_state = ref_opt.state.get(r, {}), fast_opt.state.get(f, {})
        assert set(f_state) == set(r_state), label
        for key, r_value in r_state.items():
            # (fastopt's step is float32 whatever torch's is: `_assert_same_steps` checks it.)
            assert key == "step" or f_state[key].dtype == r_value.dtype, f"{label}: {key}"
            entries.setdefault(key, []).append((i, r_value, f_state[key]))
    noise = noise or {}
    for key, values in entries.items():
        if key == "step":
            _assert_same_steps(values, where)
            continue
        key_atol = max(_scaled_atol(atol, [r for _, r, _ in values]), 2 * noise.get(key, 0.0))
        if flat:
            ref_flat = torch.cat([r.flatten() for _, r, _ in values])
            fast_flat = torch.cat([f.flatten() for _, _, f in values])
            compared = [(f"{where}: {key}", ref_flat, fast_flat)]
        else:
            compared = [(f"{where} param {i} {tuple(r.shape)}: {key}", r, f) for i, r, f in values]
        for label, r, f in compared:
            torch.testing.assert_close(
                f, r, rtol=rtol, atol=key_atol, msg=lambda m, label=label: f"{label}: {m}"
            )


def step_and_compare(
    ref_opt: torch.optim.Optimizer,
    fast_opt: torch.optim.Optimizer,
    ref_params: Sequence[Tensor],
    fast_params: Sequence[Tensor],
    gen: torch.Generator,
    steps: int,
    *,
    first: int = 0,
    flat: bool = False,
    rtol: float = FP32["rtol"],
    atol: float = FP32["atol"],
    exact: tuple[torch.optim.Optimizer, Sequence[Tensor]] | None = None,
) -> None:
    """`steps` steps of both optimizers, each after giving every param the same fresh grad,
    compared with `assert_matches_reference` after every step (numbered from `first`).

    `exact`: the torch optimizer and params of an fp64 run from the same start; it gets the
    same grads, and measures the rounding noise of torch's own run (`assert_matches_reference`).
    """
    for step in range(first, first + steps):
        grads = set_grads(gen, ref_params, fast_params)
        ref_opt.step()
        fast_opt.step()
        noise = None
        if exact is not None:
            exact_opt, exact_params = exact
            for p, g in zip(exact_params, grads, strict=True):
                p.grad = g.double()
            exact_opt.step()
            noise = rounding_noise(ref_opt, ref_params, exact_opt, exact_params)
        where = f"step {step}"
        assert_matches_reference(
            ref_opt, fast_opt, ref_params, fast_params, rtol, atol, where, flat=flat, noise=noise
        )


def rounding_noise(ref_opt, ref_params, exact_opt, exact_params) -> dict[str, float]:
    """Per quantity, the largest difference between torch's run and its fp64 twin (the `noise`
    of `assert_matches_reference`); params without state in torch's run count for `param`."""
    differences: dict[str, list[Tensor]] = {"param": []}
    for r, e in zip(ref_params, exact_params, strict=True):
        differences["param"].append(r.detach().double() - e.detach())
        for key, value in ref_opt.state.get(r, {}).items():
            if key != "step":
                differences.setdefault(key, []).append(value.double() - exact_opt.state[e][key])
    return {
        key: max((d.abs().max().item() for d in ds if d.numel()), default=0.0)
        for key, ds in differences.items()
    }


def scaler_step_and_compare(
    ref_opt: torch.optim.Optimizer,
    fast_opt: torch.optim.Optimizer,
    ref_params: Sequence[Tensor],
    fast_params: Sequence[Tensor],
    scalers: Sequence[torch.amp.GradScaler],
    where: str,
    *,
    skipped: bool,
) -> None:
    """`scaler.step(opt)` and `scaler.update()` of torch's optimizer (with `scalers[0]`) and
    fastopt's (with `scalers[1]`), after the backward of the scaled loss. Both scales stay equal.
    With `skipped` (a non-finite grad): fastopt's params, grads, state and step counts are as
    before and the scale halved; otherwise fastopt matches torch and stored its grads back
    unscaled (exactly: the scale is a power of two), in their layout (sparse ones sparse)."""
    before, scale = snapshot(fast_opt, fast_params), scalers[1].get_scale()
    scaled = [p.grad.clone() for p in fast_params]
    for opt, scaler in zip((ref_opt, fast_opt), scalers, strict=True):
        scaler.step(opt)
        scaler.update()
    assert scalers[1].get_scale() == scalers[0].get_scale(), where
    if skipped:
        assert_unchanged(fast_opt, fast_params, before)
        assert scalers[1].get_scale() == scale / 2, where
        return
    assert_matches_reference(ref_opt, fast_opt, ref_params, fast_params, **FP32, where=where)
    for p, g in zip(fast_params, scaled, strict=True):
        assert p.grad.layout == g.layout, where
        torch.testing.assert_close(
            p.grad.to_dense(), g.to_dense() / scale, rtol=0, atol=0, msg=where
        )
