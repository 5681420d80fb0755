"""Every fused optimizer against torch.optim.*(foreach=False), step by step, option
configuration by configuration (dense grads; sparse Adagrad is in test_sparse_adagrad.py): fp32
and fp64 match to rounding, params and every state tensor after each of 10 steps; fp32 under
every CPU instruction set.

Adam / AdamW run every combination of the options that take different paths through the kernel
(ADAM_OPTIONS); RMSprop / Adagrad / Adadelta every configuration torch's own test suite runs plus
those it lacks (helpers/torch_configs.py). bf16 / fp16 are in test_low_precision.py.
"""

from __future__ import annotations

import ast
import pathlib
import zlib

import pytest
import torch
from helpers.against_torch import run_against_torch
from helpers.cuda import checked_cuda
from helpers.optim_cases import ADAM_OPTIONS, NON_ADAM_OPTIMIZERS
from helpers.tolerances import TOLERANCES
from helpers.torch_configs import (
    ALL_CONFIGS,
    CONFIG_CASES,
    TORCH_CONFIGS,
    TORCH_CUDA_CONFIGS,
    with_default_lr,
)

STEPS = 10

ADAM_CASES = [
    pytest.param(name, options.values[0], id=f"{name}-{options.id}")
    for name in ["Adam", "AdamW"]
    for options in ADAM_OPTIONS
]


@pytest.mark.parametrize(("name", "options"), ADAM_CASES + CONFIG_CASES)
def test_fp32_matches_torch_under_every_isa(cpu_isa, name, options):
    seed = zlib.crc32(f"{cpu_isa}-{name}".encode()) % 1000
    run_against_torch(name, torch.float32, options, seed=seed, steps=STEPS)


# Adam's fp64 runs take the default instruction set only; the others' take every one.
@pytest.mark.parametrize(("name", "options"), ADAM_CASES)
def test_adam_fp64_matches_torch(name, options):
    run_against_torch(name, torch.float64, options, seed=7, steps=STEPS)


@pytest.mark.parametrize(("name", "options"), CONFIG_CASES)
def test_fp64_matches_torch_under_every_isa(cpu_isa, name, options):
    run_against_torch(name, torch.float64, options, seed=7, steps=STEPS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_every_config_on_cuda(dtype, name):
    """The CPU configurations and torch's CUDA-only ones (capturable), on CUDA."""
    with checked_cuda():
        for config in ALL_CONFIGS[name] + TORCH_CUDA_CONFIGS[name]:
            if dtype not in TOLERANCES and config.get("tensor_lr"):
                continue
            run_against_torch(name, dtype, with_default_lr(name, config), seed=1, device="cuda")


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


@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
def test_configs_cover_torchs_own(name):
    ours = TORCH_CONFIGS[name] + TORCH_CUDA_CONFIGS[name]
    theirs = _torch_test_configs(name)
    assert theirs, "no configurations found in torch's source"
    missing = [c for c in theirs if c not in ours]
    assert not missing, f"torch tests {name} with {missing}; add them to TORCH_CONFIGS"
