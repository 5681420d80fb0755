"""The examples in the layers' docstrings run and print what they say, and every public layer
class and function has one. (The optimizers' docstrings, fastopt.optim and
fastopt.functional.optim, are not covered here.)"""

from __future__ import annotations

import doctest
import importlib

import pytest

import fastopt.functional
import fastopt.nn

MODULES = [
    "fastopt",
    "fastopt.functional.blocksparse",
    "fastopt.functional.int8",
    "fastopt.nn.blocksparse_linear",
    "fastopt.nn.int8_linear",
]
LAYER_FUNCTIONAL = [
    *fastopt.functional.blocksparse.__all__,
    *fastopt.functional.int8.__all__,
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    results = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0, results


@pytest.mark.parametrize(
    "obj",
    [getattr(fastopt.nn, name) for name in fastopt.nn.__all__]
    + [getattr(fastopt.functional, name) for name in LAYER_FUNCTIONAL],
    ids=lambda obj: obj.__name__,
)
def test_every_public_layer_name_has_an_example(obj):
    assert ">>> " in (obj.__doc__ or ""), f"{obj.__name__} has no example in its docstring"
