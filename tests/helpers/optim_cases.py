"""What the optimizer tests run over: the optimizers, param shapes, Adam's option grid and one
argument set per optimizer that takes every optional path."""

from __future__ import annotations

import itertools

import pytest

# Every fused optimizer, by the name of its torch.optim counterpart.
OPTIMIZERS = ["Adam", "AdamW", "RMSprop", "Adagrad", "Adadelta"]

# The optimizers besides FusedAdam / FusedAdamW, whose Adam-specific tests stand apart.
NON_ADAM_OPTIMIZERS = ["RMSprop", "Adagrad", "Adadelta"]

# Odd sizes on purpose: a single element, fewer than one vector, a vector plus one, a 2-d shape
# that is no multiple of any vector width, an empty tensor, and a 0-dim tensor.
SHAPES: list[tuple[int, ...]] = [(1,), (7,), (4097,), (33, 65), (0,), ()]


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
# optional state tensor (AdamW's with non-default betas and eps).
RICH: dict[str, dict] = {
    "Adam": dict(lr=0.01, amsgrad=True, weight_decay=0.1),
    "AdamW": dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=True),
    "RMSprop": dict(lr=0.01, alpha=0.9, weight_decay=0.1, momentum=0.5, centered=True),
    "Adagrad": dict(lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.2),
    "Adadelta": dict(lr=0.5, rho=0.8, weight_decay=0.1),
}
