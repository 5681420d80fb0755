"""The optimizer op table (fastopt/_step_ops.py with csrc/optim/step_ops.h): every entry has its
schema, its kernels on every built device, its autograd and in-place kernels, its eager entry
and its functional wrapper, and the wrapper takes exactly the entry's arguments."""

from __future__ import annotations

import inspect

import pytest
import torch

import fastopt
from fastopt import _extension
from fastopt._step_ops import STEP_OPS

NAMES = [op.name for op in STEP_OPS]


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{name}", key)


@pytest.mark.parametrize("op", STEP_OPS, ids=NAMES)
def test_every_entry_is_wired_on_every_built_device(op):
    schema = getattr(torch.ops.fastopt, op.name).default._schema
    assert [a.name for a in schema.arguments][: len(op.list_names)] == list(op.list_names)
    # Each tensor list is written in place, and no two share an alias set.
    aliases = [a.alias_info for a in schema.arguments[: len(op.list_names)]]
    assert all(info is not None and info.is_write for info in aliases)
    assert len({str(info) for info in aliases}) == len(aliases)
    for key in ("CPU", "Autograd", "ADInplaceOrView"):
        assert _has_kernel(op.name, key), key
    assert _has_kernel(op.name, "CUDA") == _extension.has_kernels("cuda")
    assert callable(getattr(_extension.cpu_module(), op.name))
    assert op.name in fastopt.functional.__all__


@pytest.mark.parametrize("op", STEP_OPS, ids=NAMES)
def test_functional_wrapper_takes_the_entrys_arguments(op):
    function = getattr(fastopt.functional, op.name)
    parameters = inspect.signature(function).parameters
    shared = ["grad_scale", "found_inf", "masters", "grad_norm", "max_grad_norm", "rounding_seeds"]
    expected = [*op.list_names, "lr", *(a.name for a in op.own), *shared]
    assert sorted(parameters) == sorted(expected)
    for a in op.own:
        default = parameters[a.name].default
        assert default == (inspect.Parameter.empty if a.default is None else a.default)
    assert op.summary.split()[0] in function.__doc__ and "found_inf" in function.__doc__


def test_functional_wrapper_refuses_missing_and_unknown_arguments():
    p = torch.randn(3)
    lists = [[p], [torch.randn(3)], [torch.zeros(3)], [torch.zeros(3)], [], [torch.zeros(())]]
    before = p.clone()
    with pytest.raises(TypeError, match="beta2"):
        fastopt.functional.adam_step_(*lists, lr=0.1, beta1=0.9, eps=1e-8)
    with pytest.raises(TypeError, match="betas"):
        fastopt.functional.adam_step_(*lists, lr=0.1, betas=(0.9,), beta1=0.9, beta2=0.9, eps=0.1)
    with pytest.raises(TypeError):
        fastopt.functional.adam_step_(*lists[:-1], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8)
    assert torch.equal(p, before)


def test_error_messages_name_the_op_as_users_call_it():
    p = torch.randn(3)
    with pytest.raises(RuntimeError, match=r"fastopt\.adagrad_step_: grads has 0 tensors"):
        torch.ops.fastopt.adagrad_step_([p], [], [torch.zeros(3)], [torch.zeros(())], 0.1, None,
                                        0.0, 0.0, 1e-10, False, None, None, [], None, 0.0,
                                        [])  # fmt: skip


def test_functional_wrapper_takes_its_lists_by_keyword_too():
    gen = torch.Generator().manual_seed(0)
    start, grad = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
    results = []
    for by_keyword in (False, True):
        lists = {"params": [start.clone()], "grads": [grad.clone()], "state_sums": [torch.zeros(5)]}
        lists["steps"] = [torch.zeros(())]
        if by_keyword:
            fastopt.functional.adagrad_step_(**lists, lr=0.1)
        else:
            fastopt.functional.adagrad_step_(*lists.values(), lr=0.1)
        results.append(lists["params"][0])
    assert not torch.equal(results[0], start)
    assert torch.equal(results[0], results[1])
