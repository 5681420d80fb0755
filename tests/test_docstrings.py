"""The examples in the docstrings run and print what they say, and every public class and
function has one: layers, optimizers, functional steps, clipping."""

from __future__ import annotations

import doctest
import importlib

import pytest

import fastopt.functional
import fastopt.nn
import fastopt.optim

MODULES = [
    "fastopt",
    "fastopt.clip",
    "fastopt.functional.optim",
    "fastopt.optim._precision",
    "fastopt.optim.adadelta",
    "fastopt.optim.adagrad",
    "fastopt.optim.adam",
    "fastopt.optim.rmsprop",
    "fastopt.functional.blocksparse",
    "fastopt.functional.int8",
    "fastopt.nn.blocksparse_linear",
    "fastopt.nn.int8_linear",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    results = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0, results


@pytest.mark.parametrize(
    "obj",
    [getattr(fastopt.nn, name) for name in fastopt.nn.__all__]
    + [getattr(fastopt.functional, name) for name in fastopt.functional.__all__]
    + [getattr(fastopt.optim, name) for name in fastopt.optim.__all__]
    + [fastopt.clip_grad_norm_],
    ids=lambda obj: obj.__name__,
)
def test_every_public_name_has_an_example(obj):
    assert ">>> " in (obj.__doc__ or ""), f"{obj.__name__} has no example in its docstring"
