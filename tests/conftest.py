"""Shared helpers for fastopt's tests: paired params for fastopt and the torch reference, fresh
random grads, state comparison, and a fixture that runs a test under each CPU instruction set.

Helpers are imported by the test files with ``from conftest import ...``.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import itertools
import os
from collections.abc import Callable, Iterator, Sequence

import pytest
import torch
from torch import Tensor

# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter. The variable must
# be set before any module defining @triton.jit kernels is imported, so before fastopt is.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import cuda_emulation  # noqa: E402

import fastopt  # noqa: E402
from fastopt import _extension

# Odd sizes on purpose: a single element, fewer than one vector, a vector plus one, a 2-d shape
# that is no multiple of any vector width, an empty tensor, and a 0-dim tensor.
SHAPES: list[tuple[int, ...]] = [(1,), (7,), (4097,), (33, 65), (0,), ()]

# rtol, atol of the fp32 / fp64 comparisons with torch.optim.*(foreach=False).
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


# The marks of a test that needs a CUDA GPU itself (streams, graphs, several GPUs, CUDA tensors):
# selected by `-m cuda`, and skipped, with the reason said, where there is no GPU.
ON_CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The marks of a test (or a test's case) of fastopt's CUDA kernels: on a GPU where there is one,
# else on the CPU through their emulation (`cuda_kernels`).
ON_CUDA_KERNELS = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() or cuda_emulation.available()),
        reason="needs a CUDA GPU, or fastopt's emulated CUDA kernels (built with its CUDA "
        "extension unless FASTOPT_CUDA_EMULATION=0)",
    ),
]


@contextlib.contextmanager
def checked_cuda() -> Iterator[None]:
    """Around a test on CUDA. On a GPU machine the CUDA kernels must be there: a missing build
    is a failure, not a skip. Synchronizes after, so that an asynchronous CUDA error is blamed
    on the test that caused it."""
    if not _extension.has_kernels("cuda"):
        pytest.fail(f"fastopt's CUDA kernels are not loaded: {_extension._load_errors.get('cuda')}")
    yield
    torch.cuda.synchronize()


@contextlib.contextmanager
def cuda_kernels() -> Iterator[str]:
    """Around a test of fastopt's CUDA kernels; gives the device its tensors go on: "cuda" on a
    GPU machine, else "cpu", with fastopt's optimizer ops running their CUDA kernels' code,
    emulated thread by thread (tests/cuda_emulation.py)."""
    if torch.cuda.is_available():
        with checked_cuda():
            yield "cuda"
    else:
        with cuda_emulation.emulated_cuda_kernels():
            yield "cpu"


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=ON_CUDA_KERNELS)])
def device(request) -> Iterator[str]:
    """Runs the test with fastopt's CPU kernels and with its CUDA kernels (on a GPU, or emulated
    on the CPU without one; see `cuda_kernels`). Gives the device to put tensors on."""
    if request.param == "cuda":
        with cuda_kernels() as kernel_device:
            yield kernel_device
    else:
        yield request.param


# Every combination of the options that take different paths through the kernels (`tensor_lr`
# is an option of `run_against_torch`, not of the optimizers).
ADAM_OPTIONS = [
    pytest.param(
        dict(amsgrad=amsgrad, maximize=maximize, weight_decay=wd, tensor_lr=tensor_lr),
        id=f"ams{int(amsgrad)}-max{int(maximize)}-wd{wd}-{'tlr' if tensor_lr else 'flr'}",
    )
    for amsgrad, maximize, wd, tensor_lr in itertools.product(
        [False, True], [False, True], [0.0, 0.1], [False, True]
    )
]


# Per optimizer, arguments that take every optional path of its kernel at once and create every
# optional state tensor: the test files' `RICH` add their FusedAdam / FusedAdamW arguments.
RICH_OPTIONS: dict[str, dict] = {
    "RMSprop": dict(lr=0.01, alpha=0.9, weight_decay=0.1, momentum=0.5, centered=True),
    "Adagrad": dict(lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.2),
    "Adadelta": dict(lr=0.5, rho=0.8, weight_decay=0.1),
}


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


def mixed_dtype_starts(gen: torch.Generator, device: str | torch.device) -> list[Tensor]:
    """Start values for one group of mixed dtypes: fp32, fp64, bf16, fp16 and an empty fp32."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float32]
    shapes = [(7,), (4097,), (33, 65), (4097,), (0,)]
    return [
        torch.randn(s, generator=gen).to(dtype=d, device=device)
        for s, d in zip(shapes, dtypes, strict=True)
    ]


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


def fp64_twin(
    name: str, ref_params: Sequence[Tensor], **kwargs
) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """torch.optim.`name`(foreach=False, **kwargs) on fp64 copies of `ref_params`: the `exact`
    argument of `step_and_compare` (a Tensor lr is upcast too)."""
    if isinstance(kwargs.get("lr"), Tensor):
        kwargs["lr"] = kwargs["lr"].double()
    exact_params = [p.detach().double().requires_grad_() for p in ref_params]
    return getattr(torch.optim, name)(exact_params, foreach=False, **kwargs), exact_params


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
    params and grads in `dtype`, judged after every step: in fp32 / fp64 fastopt must match
    torch to rounding (`_judge_exact`), in bf16 / fp16 be as accurate as torch
    (`_judge_low_precision`).

    `options` holds the optimizer's keyword arguments (lr defaults to 0.01), and in fp32 / fp64
    optionally `tensor_lr`: pass lr as a Tensor.
    """
    ref_params, fast_params = make_param_pairs(shapes, dtype, device=device, seed=seed)
    judge = _judge_exact if dtype in TOLERANCES else _judge_low_precision
    judge(name, dict(options), ref_params, fast_params, generator(seed + 1), steps)


def _judge_exact(name, options, ref_params, fast_params, gen, steps) -> None:
    """Params and every state tensor within TOLERANCES of torch's after every step (in fp32,
    or within twice torch's own rounding noise, measured by an fp64 twin of torch's run).

    `options["tensor_lr"]`: a Tensor lr on the params' device, in their precision (torch
    computes lr / bias_correction in the lr's dtype, so an fp32 lr would round torch's fp64
    step sizes to fp32).
    """
    dtype, device = fast_params[0].dtype, fast_params[0].device
    lr = options.pop("lr", 0.01)
    if options.pop("tensor_lr", False):
        lr = torch.tensor(lr, dtype=dtype, device=device)
    ref, fast = optimizer_pair(name, ref_params, fast_params, lr=lr, **options)
    exact = fp64_twin(name, ref_params, lr=lr, **options) if dtype == torch.float32 else None
    rtol, atol = TOLERANCES[dtype]
    step_and_compare(
        ref, fast, ref_params, fast_params, gen, steps, rtol=rtol, atol=atol, exact=exact
    )
    for p in fast_params:
        assert_state_format(fast, p, state_keys(name, options))


def _max_error(values: Sequence[Tensor], references: Sequence[Tensor]) -> float:
    """The largest absolute error over all elements of all tensors."""
    worst = 0.0
    for value, reference in zip(values, references, strict=True):
        if reference.numel():
            worst = max(worst, (value.double() - reference.double()).abs().max().item())
    return worst


def _low_precision_eps(name: str, dtype: torch.dtype) -> float:
    """torch's default eps; but fp16 cannot hold the defaults of Adam, RMSprop and Adagrad (1e-8,
    1e-10 round to 0, and torch divides 0 by 0 where a tiny grad's square underflows): there
    1e-3 keeps the plain torch fp16 run finite, a fair yardstick."""
    default = inspect.signature(getattr(torch.optim, name)).parameters["eps"].default
    return max(default, 1e-3) if dtype == torch.float16 and default < 1e-6 else default


def ulp(t: Tensor) -> Tensor:
    """The spacing of `t`'s dtype at each of its values, in float32."""
    up = torch.nextafter(t.abs(), torch.full_like(t, float("inf")))
    return up.float() - t.abs().float()


def _judge_low_precision(name, options, low, fast, gen, steps) -> None:
    """fastopt and torch in the params' precision (bf16 / fp16) are both measured against torch
    in fp32 from the same (upcast) start with the same grads: after every step, fastopt's
    largest error on the params and on every state tensor is at most 2x torch's, plus one ulp
    of the values' magnitude."""
    dtype = fast[0].dtype
    kwargs = {"lr": 1e-2, "eps": _low_precision_eps(name, dtype), **options}
    high = [p.detach().float().requires_grad_() for p in low]
    low_opt, fast_opt = optimizer_pair(name, low, fast, **kwargs)
    high_opt = getattr(torch.optim, name)(high, foreach=False, **kwargs)
    keys = ["param", *state_keys(name, options)]
    for step in range(steps):
        grads = set_grads(gen, low, fast)
        for h, g in zip(high, grads, strict=True):
            h.grad = g.float()  # the same low-precision grads, exactly
        for opt in (low_opt, fast_opt, high_opt):
            opt.step()
        for key in keys:

            def values(opt, params, key=key):
                return list(params) if key == "param" else [opt.state[p][key] for p in params]

            assert_error_within_torchs(
                values(fast_opt, fast),
                values(low_opt, low),
                values(high_opt, high),
                f"step {step} {key}",
            )


def assert_error_within_torchs(
    fast_values: Sequence[Tensor],
    low_values: Sequence[Tensor],
    high_values: Sequence[Tensor],
    where: str,
) -> None:
    """fastopt's largest error against torch's fp32 run (`high_values`) is at most 2x that of
    torch run in the same low precision as fastopt (`low_values`, which must be finite), plus one
    ulp of the values' magnitude."""
    dtype = low_values[0].dtype
    assert all(v.dtype == dtype for v in fast_values), where
    assert all(v.isfinite().all() for v in low_values), f"{where}: torch {dtype} run not finite"
    torch_error = _max_error(low_values, high_values)
    fast_error = _max_error(fast_values, high_values)
    magnitude = max((v.abs().max().item() for v in high_values if v.numel()), default=0)
    assert fast_error <= 2 * torch_error + torch.finfo(dtype).eps * magnitude, (
        f"{where}: fastopt error {fast_error:.3g}, torch {dtype} error {torch_error:.3g}"
    )


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
