"""FusedRMSprop / FusedAdagrad / FusedAdadelta against torch.optim.RMSprop / Adagrad /
Adadelta(foreach=False), step by step (dense grads; sparse Adagrad is in test_sparse_adagrad.py).

Every option combination torch's own test suite runs for these optimizers
(torch/testing/_internal/common_optimizers.py), plus Tensor lr and combinations it lacks: fp32
and fp64 match to rounding, params and every state tensor after
each of 10 steps; bf16 / fp16 are judged against the error of a plain torch run in the same
precision, both measured against an fp32 reference; all under every CPU instruction set.
"""

from __future__ import annotations

import ast
import inspect
import pathlib
import zlib

import pytest
import torch
from conftest import (
    ON_CUDA_KERNELS,
    RICH_OPTIONS,
    TOLERANCES,
    cuda_kernels,
    generator,
    mixed_dtype_starts,
    run_against_torch,
    set_grads,
    state_keys,
    ulp,
)

import fastopt

NAMES = ["RMSprop", "Adagrad", "Adadelta"]

# torch's CPU configurations, as common_optimizers.py lists them (a Tensor lr there is written
# here as lr plus tensor_lr=True); `test_configs_cover_torchs_own` checks that none is missing.
TORCH_CONFIGS = {
    "RMSprop": [
        {},
        dict(lr=1e-3),
        dict(weight_decay=0.1),
        dict(maximize=True),
        dict(weight_decay=0.1, centered=True),
        dict(maximize=True, weight_decay=0.1),
        dict(weight_decay=0.1, centered=True, momentum=0.1),
        dict(weight_decay=0.1, centered=True, momentum=0.1, maximize=True),
    ],
    "Adagrad": [
        {},
        dict(weight_decay=0.1),
        dict(weight_decay=0.1, maximize=True),
        dict(lr=0.1),
        dict(initial_accumulator_value=0.1, weight_decay=0.1),
        dict(lr=0.1, lr_decay=0.5, weight_decay=0.1),
        dict(lr=0.001, tensor_lr=True),
    ],
    "Adadelta": [
        {},
        dict(lr=0.01),
        dict(weight_decay=0.1),
        dict(maximize=True),
        dict(weight_decay=0.1, maximize=True),
        dict(rho=0.95, weight_decay=0.9),
    ],
}

# torch's CUDA-only configurations (capturable=True is refused by torch for CPU params).
TORCH_CUDA_CONFIGS = {
    "RMSprop": [
        dict(capturable=True),
        dict(weight_decay=0.1, maximize=True, capturable=True),
        dict(lr=0.001, tensor_lr=True, capturable=True),
    ],
    "Adagrad": [],
    "Adadelta": [
        dict(capturable=True),
        dict(weight_decay=0.1, capturable=True),
        dict(lr=0.001, tensor_lr=True, capturable=True),
    ],
}

# What torch's list leaves out: a Tensor lr with each optimizer's paths, momentum without
# centering, non-default alpha / rho / eps, lr_decay with the other Adagrad options.
EXTRA_CONFIGS = {
    "RMSprop": [
        dict(tensor_lr=True),
        dict(momentum=0.9),
        dict(centered=True, alpha=0.9, eps=1e-6),
        dict(momentum=0.5, centered=True, weight_decay=0.1, maximize=True, tensor_lr=True),
    ],
    "Adagrad": [
        dict(lr_decay=0.1, initial_accumulator_value=0.5, eps=1e-6, maximize=True),
        dict(lr_decay=0.2, weight_decay=0.1, tensor_lr=True),
    ],
    "Adadelta": [
        dict(tensor_lr=True),
        dict(lr=0.5, rho=0.8, eps=1e-4, weight_decay=0.1, maximize=True, tensor_lr=True),
    ],
}


def _default(name: str, argument: str):
    return inspect.signature(getattr(torch.optim, name)).parameters[argument].default


def _options(name: str, config: dict) -> dict:
    """`config` with an explicit lr: torch's default where it has none (1.0 for Adadelta)."""
    return {"lr": _default(name, "lr"), **config}


def _config_id(config: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in config.items()) or "default"


def _cases(configs: dict[str, list[dict]], low_precision: bool = False) -> list:
    return [
        pytest.param(name, _options(name, c), id=f"{name}-{_config_id(c)}")
        for name in NAMES
        for c in configs[name]
        # The low-precision judge takes float lrs only.
        if not (low_precision and c.get("tensor_lr"))
    ]


ALL_CONFIGS = {name: TORCH_CONFIGS[name] + EXTRA_CONFIGS[name] for name in NAMES}
CASES = _cases(ALL_CONFIGS)
LOW_PRECISION_CASES = _cases(ALL_CONFIGS, low_precision=True)
STEPS = 10


@pytest.mark.parametrize(("name", "options"), CASES)
def test_fp32_matches_torch_under_every_isa(cpu_isa, name, options):
    seed = zlib.crc32(f"{cpu_isa}-{name}".encode()) % 1000
    run_against_torch(name, torch.float32, options, seed=seed, steps=STEPS)


@pytest.mark.parametrize(("name", "options"), CASES)
def test_fp64_matches_torch_under_every_isa(cpu_isa, name, options):
    run_against_torch(name, torch.float64, options, seed=7, steps=STEPS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "options"), LOW_PRECISION_CASES)
def test_low_precision_error_is_within_torchs_under_every_isa(cpu_isa, dtype, name, options):
    """fastopt in bf16/fp16 is at most ~2x as far from an fp32 reference as torch in bf16/fp16
    (each instruction set converts to and from float in its own way)."""
    run_against_torch(name, dtype, options, seed=21, steps=STEPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NAMES)
@ON_CUDA_KERNELS[0]
@ON_CUDA_KERNELS[1]
def test_every_config_on_cuda(dtype, name):
    """The CPU configurations and, on a GPU, torch's CUDA-only ones (capturable: torch refuses it
    for the CPU tensors of the emulated kernels' runs), with fastopt's CUDA kernels."""
    with cuda_kernels() as device:
        torch_only = TORCH_CUDA_CONFIGS[name] if device == "cuda" else []
        for config in ALL_CONFIGS[name] + torch_only:
            if dtype not in TOLERANCES and config.get("tensor_lr"):
                continue
            run_against_torch(name, dtype, _options(name, config), seed=1, device=device)


def _torch_test_configs(name: str) -> list[dict]:
    """The kwargs of every OptimizerInput in torch's optim_inputs_func_<name>, read from its
    source (importing it needs torch's test-only dependencies)."""
    source = pathlib.Path(torch.testing.__file__).parent / "_internal" / "common_optimizers.py"
    if not source.exists():
        pytest.skip("this torch build ships without torch/testing/_internal")
    tree = ast.parse(source.read_text())
    func = next(
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef) and node.name == f"optim_inputs_func_{name.lower()}"
    )
    configs = []
    for call in ast.walk(func):
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "OptimizerInput":
            kwargs = next(k.value for k in call.keywords if k.arg == "kwargs")
            config = {}
            for key, value in zip(kwargs.keys, kwargs.values, strict=True):
                if isinstance(value, ast.Call):  # lr=torch.tensor(x)
                    config.update(lr=ast.literal_eval(value.args[0]), tensor_lr=True)
                else:
                    config[ast.literal_eval(key)] = ast.literal_eval(value)
            configs.append(config)
    return configs


@pytest.mark.parametrize("name", NAMES)
def test_configs_cover_torchs_own(name):
    ours = TORCH_CONFIGS[name] + TORCH_CUDA_CONFIGS[name]
    theirs = _torch_test_configs(name)
    assert theirs, "no configurations found in torch's source"
    missing = [c for c in theirs if c not in ours]
    assert not missing, f"torch tests {name} with {missing}; add them to TORCH_CONFIGS"


RICH = RICH_OPTIONS

# Thread splits, offsets, non-finite values, closures, signatures, accepted arguments and many
# small params: test_every_optimizer_reference.py, for every optimizer.

# -- low precision (one rounding per element: test_every_optimizer_reference.py) ---------


@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_in_one_group(device, name):
    """One group (one kernel call) of fp32, fp64, bf16 and fp16 params: each param ends as it
    does in a group of its own dtype; fp32 / fp64 match torch, state is in the param's dtype."""
    gen = generator(31)
    starts = mixed_dtype_starts(gen, device)
    kwargs = {**RICH[name], "eps": 1e-3 if name != "Adadelta" else 1e-6}
    mixed = [s.clone().requires_grad_() for s in starts]
    alone = [s.clone().requires_grad_() for s in starts]
    ref = [s.clone().requires_grad_() for s in starts]
    mixed_opt = getattr(fastopt, f"Fused{name}")(mixed, **kwargs)
    alone_opts = [getattr(fastopt, f"Fused{name}")([p], **kwargs) for p in alone]
    ref_opt = getattr(torch.optim, name)(ref, foreach=False, **kwargs)
    for step in range(5):
        grads = set_grads(gen, mixed, alone)
        for r, g in zip(ref, grads, strict=True):
            r.grad = g.clone()
        for opt in (mixed_opt, *alone_opts, ref_opt):
            opt.step()
        for i, (m, a, r) in enumerate(zip(mixed, alone, ref, strict=True)):
            where = f"step {step} param {i} {m.dtype}"
            if m.dtype in TOLERANCES:
                rtol, atol = TOLERANCES[m.dtype]
                torch.testing.assert_close(m, r, rtol=rtol, atol=atol, msg=where)
            error = (m.detach().float() - a.detach().float()).abs()
            assert bool((error <= ulp(a.detach())).all()), f"{where}: {error.max().item()}"
    for p in mixed:
        state = mixed_opt.state[p]
        assert set(state) == {"step", *state_keys(name, kwargs)}
        assert all(state[k].dtype == p.dtype for k in state if k != "step")
        assert state["step"].item() == 5
