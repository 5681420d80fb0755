"""Shared helpers for fastopt's tests: paired params for fastopt and the torch reference, fresh
random grads, state comparison, and a fixture that runs a test under each CPU instruction set.

Helpers are imported by the test files with ``from conftest import ...``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytest
import torch
from torch import Tensor

import fastopt
from fastopt import _extension

# Odd sizes on purpose: a single element, fewer than one vector, a vector plus one, a 2-d shape
# that is no multiple of any vector width, an empty tensor, and a 0-dim tensor.
SHAPES: list[tuple[int, ...]] = [(1,), (7,), (4097,), (33, 65), (0,), ()]

# rtol, atol of the fp32 / fp64 comparisons with torch.optim.Adam(foreach=False).
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-12, 1e-12),
}

# The fp32 tolerances as keyword arguments, for the tests that compare fp32 runs only.
FP32 = dict(zip(("rtol", "atol"), TOLERANCES[torch.float32], strict=True))

_ISA_ORDER = ("baseline", "avx2", "avx512")


def supported_cpu_isas() -> list[str]:
    """Every instruction set fastopt's CPU kernels can use on this CPU, narrowest first."""
    best = _extension.cpu_module().best_cpu_isa()
    return list(_ISA_ORDER[: _ISA_ORDER.index(best) + 1])


@pytest.fixture(params=supported_cpu_isas())
def cpu_isa(request) -> str:
    """Runs the test once per instruction set this CPU supports, restoring the choice after."""
    module = _extension.cpu_module()
    previous = module.set_cpu_isa(request.param)
    try:
        assert module.active_cpu_isa() == request.param
        yield request.param
    finally:
        module.set_cpu_isa(previous)


def generator(seed: int) -> torch.Generator:
    """A CPU generator: tensors are drawn on the CPU and copied, so every device sees the same."""
    return torch.Generator().manual_seed(seed)


def make_param_pairs(
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    layout: Callable[[Tensor], Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Two lists of leaf params with equal values and strides: (for torch, for fastopt).

    `layout` maps a fresh contiguous tensor to the memory layout wanted (e.g. a transpose).
    """
    gen = generator(seed)
    ref, fast = [], []
    for shape in shapes:
        base = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        if layout is not None:
            base = layout(base)
        ref.append(base.clone(memory_format=torch.preserve_format).requires_grad_())
        fast.append(base.clone(memory_format=torch.preserve_format).requires_grad_())
        assert ref[-1].stride() == base.stride() == fast[-1].stride()
    return ref, fast


def set_grads(gen: torch.Generator, *param_lists: Sequence[Tensor]) -> list[Tensor]:
    """Gives the i-th param of every list the same fresh grad, in each param's own dtype, device
    and layout. Returns the grads of the first list."""
    grads = []
    for group in zip(*param_lists, strict=True):
        values = torch.randn(group[0].shape, generator=gen, dtype=torch.float64)
        for p in group:
            g = torch.empty_like(p, memory_format=torch.preserve_format)
            g.copy_(values)
            p.grad = g
        grads.append(group[0].grad)
    return grads


def assert_state_format(opt: torch.optim.Optimizer, p: Tensor, amsgrad: bool) -> None:
    """The state of `p` has torch.optim.Adam's keys, a float32 0-dim step, and per-element state
    in the param's dtype, device and layout."""
    state = opt.state[p]
    expected = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    assert set(state) == expected
    step = state["step"]
    assert isinstance(step, Tensor) and step.dtype == torch.float32 and step.dim() == 0
    for key in expected - {"step"}:
        t = state[key]
        assert (t.dtype, t.device, t.shape) == (p.dtype, p.device, p.shape), key
        if p.numel() > 1:
            assert t.stride() == p.stride(), key


def _scale(tensors: Sequence[Tensor]) -> float:
    """The largest finite magnitude among `tensors` (0 if there is none)."""
    scale = 0.0
    for t in tensors:
        finite = t[t.isfinite()]
        if finite.numel():
            scale = max(scale, finite.abs().max().item())
    return scale


def assert_matches_reference(
    ref_opt: torch.optim.Optimizer,
    fast_opt: torch.optim.Optimizer,
    ref_params: Sequence[Tensor],
    fast_params: Sequence[Tensor],
    rtol: float,
    atol: float,
    where: str = "",
) -> None:
    """Params and every state tensor (and the exact step count) agree with the reference.

    `atol` only guards elements near zero (where cancellation, e.g. in exp_avg's lerp, leaves
    an absolute error of the operands' rounding): it is shrunk by the largest magnitude of that
    quantity over all params (exp_avg_sq is ~1e-3 * grad**2), never grown.
    """
    ref_states = [ref_opt.state.get(r, {}) for r in ref_params]
    atols = {}
    for key in ("param", *{k for state in ref_states for k in state if k != "step"}):
        values = (
            [r.detach() for r in ref_params]
            if key == "param"
            else [state[key] for state in ref_states if key in state]
        )
        scale = _scale(values)
        atols[key] = atol * min(1.0, scale) if scale > 0 else atol
    for i, (r, f) in enumerate(zip(ref_params, fast_params, strict=True)):
        msg = f"{where} param {i} {tuple(r.shape)}"
        assert f.dtype == r.dtype and f.shape == r.shape and f.stride() == r.stride(), msg
        torch.testing.assert_close(
            f.detach(),
            r.detach(),
            rtol=rtol,
            atol=atols["param"],
            msg=lambda m, msg=msg: f"{msg}: {m}",
        )
        r_state, f_state = ref_states[i], fast_opt.state.get(f, {})
        assert set(f_state) == set(r_state), msg
        for key, r_value in r_state.items():
            f_value = f_state[key]
            if key == "step":
                assert f_value.dtype == torch.float32 and f_value.dim() == 0, msg
                assert f_value.item() == r_value.item(), f"{msg}: step"
            else:
                assert f_value.dtype == r_value.dtype, f"{msg}: {key}"
                torch.testing.assert_close(
                    f_value,
                    r_value,
                    rtol=rtol,
                    atol=atols[key],
                    msg=lambda m, k=key, msg=msg: f"{msg}: {k}: {m}",
                )


def assert_matches_reference_flat(
    ref_opt: torch.optim.Optimizer,
    fast_opt: torch.optim.Optimizer,
    ref_params: Sequence[Tensor],
    fast_params: Sequence[Tensor],
    rtol: float,
    atol: float,
    where: str = "",
) -> None:
    """`assert_matches_reference` for thousands of params: each quantity is compared once, over
    all params concatenated (the params that have state, for the state tensors)."""
    stepped = [(r, f) for r, f in zip(ref_params, fast_params, strict=True) if r in ref_opt.state]
    assert [f in fast_opt.state for f in fast_params] == [r in ref_opt.state for r in ref_params]
    keys = {k for r, _ in stepped for k in ref_opt.state[r]}
    assert all(set(fast_opt.state[f]) == set(ref_opt.state[r]) for r, f in stepped), where
    for key in ("param", *sorted(keys)):
        if key == "param":
            pairs = [(r.detach(), f.detach()) for r, f in zip(ref_params, fast_params, strict=True)]
        else:
            pairs = [(ref_opt.state[r][key], fast_opt.state[f][key]) for r, f in stepped]
        if key == "step":
            ref_steps = torch.stack([r.to("cpu", torch.float32) for r, _ in pairs])
            fast_steps = torch.stack([f.cpu() for _, f in pairs])
            assert all(f.dtype == torch.float32 and f.dim() == 0 for _, f in pairs), where
            assert torch.equal(fast_steps, ref_steps), f"{where}: step"
            continue
        ref_flat = torch.cat([r.flatten() for r, _ in pairs])
        fast_flat = torch.cat([f.flatten() for _, f in pairs])
        assert fast_flat.dtype == ref_flat.dtype, f"{where}: {key}"
        scale = _scale([ref_flat])
        torch.testing.assert_close(
            fast_flat,
            ref_flat,
            rtol=rtol,
            atol=atol * min(1.0, scale) if scale > 0 else atol,
            msg=lambda m, key=key: f"{where}: {key}: {m}",
        )


def snapshot(opt: torch.optim.Optimizer, params: Sequence[Tensor]) -> dict:
    """Copies of everything a step may change: params, grads, and the whole optimizer state."""
    return {
        "params": [p.detach().clone() for p in params],
        "grads": [None if p.grad is None else p.grad.clone() for p in params],
        "state_keys": [p in opt.state for p in params],
        "state": {
            i: copy.deepcopy(dict(opt.state[p])) for i, p in enumerate(params) if p in opt.state
        },
    }


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.layout != b.layout or a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    if a.device.type == "meta":
        return True
    if a.is_sparse:
        a, b = a.to_dense(), b.to_dense()
    return torch.equal(a, b) or bool(((a == b) | (a.isnan() & b.isnan())).all())


def assert_unchanged(opt: torch.optim.Optimizer, params: Sequence[Tensor], before: dict) -> None:
    """Nothing that `snapshot` copied has changed, and no state was created or dropped."""
    after = snapshot(opt, params)
    for i in range(len(params)):
        assert _same(after["params"][i], before["params"][i]), f"param {i} changed"
        assert _same(after["grads"][i], before["grads"][i]), f"grad of param {i} changed"
        assert after["state_keys"][i] == before["state_keys"][i], f"state of param {i} created"
    assert after["state"].keys() == before["state"].keys()
    for i, state in before["state"].items():
        assert after["state"][i].keys() == state.keys(), f"state keys of param {i} changed"
        for key, value in state.items():
            assert _same(after["state"][i][key], value), f"state {key!r} of param {i} changed"


def optimizer_pair(
    name: str, ref_params, fast_params, **kwargs
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """torch.optim.`name`(foreach=False) and fastopt.Fused`name` with the same arguments.
    A Tensor lr is cloned, so the two never share it."""
    ref_kwargs = dict(kwargs)
    fast_kwargs = dict(kwargs)
    if isinstance(kwargs.get("lr"), Tensor):
        ref_kwargs["lr"] = kwargs["lr"].clone()
        fast_kwargs["lr"] = kwargs["lr"].clone()
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **ref_kwargs)
    fast = getattr(fastopt, f"Fused{name}")(fast_params, **fast_kwargs)
    return ref, fast


def run_against_torch(
    name: str,
    dtype: torch.dtype,
    options: dict,
    seed: int,
    steps: int = 10,
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    device: str | torch.device = "cpu",
) -> None:
    """`steps` steps of torch.optim.`name`(foreach=False) and fastopt.Fused`name` on the same
    params and grads, compared (params and every state tensor) after every step.

    `options` holds amsgrad, maximize, weight_decay and tensor_lr (a Tensor lr on `device`, in
    the params' precision: torch computes lr / bias_correction in the lr's dtype, so an fp32 lr
    would round torch's fp64 step sizes to fp32).
    """
    options = dict(options)
    tensor_lr = options.pop("tensor_lr")
    lr = torch.tensor(0.01, dtype=dtype, device=device) if tensor_lr else 0.01
    ref_params, fast_params = make_param_pairs(shapes, dtype, device=device, seed=seed)
    ref, fast = optimizer_pair(name, ref_params, fast_params, lr=lr, **options)
    rtol, atol = TOLERANCES[dtype]
    gen = generator(seed + 1)
    for step in range(steps):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, rtol, atol, f"step {step}")
    for p in fast_params:
        assert_state_format(fast, p, options.get("amsgrad", False))


def _max_error(values: Sequence[Tensor], references: Sequence[Tensor]) -> float:
    """The largest absolute error over all elements of all tensors."""
    worst = 0.0
    for value, reference in zip(values, references, strict=True):
        if reference.numel():
            worst = max(worst, (value.double() - reference.double()).abs().max().item())
    return worst


def run_low_precision_against_torch(
    name: str,
    dtype: torch.dtype,
    options: dict,
    seed: int,
    steps: int = 10,
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    device: str | torch.device = "cpu",
) -> None:
    """fastopt in `dtype` (bf16/fp16) against torch in `dtype`, both measured against torch in
    fp32 from the same (upcast) start with the same grads: after every step, fastopt's largest
    error on the params and on every state tensor is at most 2x torch's, plus one ulp of the
    values' magnitude."""
    # fp16 cannot hold eps=1e-8 (it rounds to 0, and torch divides 0 by 0 where a tiny grad's
    # square underflows); 1e-3 keeps the plain torch fp16 run finite, a fair yardstick.
    eps = 1e-3 if dtype == torch.float16 else 1e-8
    kwargs = dict(lr=1e-2, eps=eps, **options)
    low, fast = make_param_pairs(shapes, dtype, device=device, seed=seed)
    high = [p.detach().float().requires_grad_() for p in low]
    low_opt, fast_opt = optimizer_pair(name, low, fast, **kwargs)
    high_opt = getattr(torch.optim, name)(high, foreach=False, **kwargs)
    keys = ["param", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if options["amsgrad"] else [])
    ulp = torch.finfo(dtype).eps
    gen = generator(seed + 1)
    for step in range(steps):
        grads = set_grads(gen, low, fast)
        for h, g in zip(high, grads, strict=True):
            h.grad = g.float()  # the same low-precision grads, exactly
        for opt in (low_opt, fast_opt, high_opt):
            opt.step()
        for key in keys:

            def values(opt, params, key=key):
                return list(params) if key == "param" else [opt.state[p][key] for p in params]

            low_values = values(low_opt, low)
            fast_values = values(fast_opt, fast)
            high_values = values(high_opt, high)
            assert all(v.dtype == dtype for v in fast_values), key
            assert all(v.isfinite().all() for v in low_values), f"torch {dtype} run not finite"
            torch_error = _max_error(low_values, high_values)
            fast_error = _max_error(fast_values, high_values)
            magnitude = max((v.abs().max().item() for v in high_values if v.numel()), default=0)
            assert fast_error <= 2 * torch_error + ulp * magnitude, (
                f"step {step} {key}: fastopt error {fast_error:.3g}, torch {dtype} error "
                f"{torch_error:.3g}"
            )
