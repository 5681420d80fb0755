"""The option configurations RMSprop / Adagrad / Adadelta are judged against torch with: every
one torch's own test suite runs (torch/testing/_internal/common_optimizers.py), plus Tensor lr and
combinations it lacks."""

from __future__ import annotations

import inspect

import pytest
import torch

from helpers.optim_cases import NON_ADAM_OPTIMIZERS

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


def with_default_lr(name: str, config: dict) -> dict:
    """`config` with an explicit lr: torch's default where it has none (1.0 for Adadelta)."""
    return {"lr": _default(name, "lr"), **config}


def _config_id(config: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in config.items()) or "default"


def _cases(configs: dict[str, list[dict]], low_precision: bool = False) -> list:
    return [
        pytest.param(name, with_default_lr(name, c), id=f"{name}-{_config_id(c)}")
        for name in NON_ADAM_OPTIMIZERS
        for c in configs[name]
        # The low-precision judge takes float lrs only.
        if not (low_precision and c.get("tensor_lr"))
    ]


ALL_CONFIGS = {name: TORCH_CONFIGS[name] + EXTRA_CONFIGS[name] for name in NON_ADAM_OPTIMIZERS}
# The (name, options) cases of the reference tests: every configuration, and those whose lr is a
# float (the low-precision judge takes float lrs only).
CONFIG_CASES = _cases(ALL_CONFIGS)
LOW_PRECISION_CONFIG_CASES = _cases(ALL_CONFIGS, low_precision=True)
