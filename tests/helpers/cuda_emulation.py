"""fastopt's CUDA optimizer kernels run on the CPU, for the tests of a machine without a GPU.

`fastopt/_C_cuda_emulation` is the .cu source of csrc/optim/cuda compiled by the host compiler,
each launch run thread by thread (csrc/optim/cuda/emulation.h). Its kernels register for the CPU
under the namespace `fastopt_cuda_emulation`, whose op schemas are fastopt's own, defined here.
`emulated_cuda_kernels()` sends the fastopt optimizer ops' CPU calls to them for its duration, so
that a test written for CUDA tensors runs the CUDA kernels' code (host and device parts) on CPU
tensors.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

import fastopt
from fastopt import _extension
from fastopt._step_ops import STEP_OPS

NAMESPACE = "fastopt_cuda_emulation"
# Every op with a CUDA kernel in csrc/optim/cuda (the op table's, sparse Adagrad and the gradient
# norm), with the dispatch keys of its CPU kernels.
OPS = {
    **{op.name: ("CPU",) for op in STEP_OPS},
    "sparse_adagrad_step_": ("CPU", "SparseCPU"),
    "grad_norm": ("CPU",),
}


def library_path() -> Path | None:
    """The built emulation library, or None."""
    if not _extension.build_info().get("CUDA_EMULATION_BUILT"):
        return None
    folder = Path(fastopt.__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"_C_cuda_emulation{suffix}"
        if path.exists():
            return path
    return None


def available() -> bool:
    """Whether the emulated CUDA kernels were built (setup.py builds them with the CUDA
    extension, unless FASTOPT_CUDA_EMULATION=0)."""
    return library_path() is not None


@functools.cache
def _load() -> torch.library.Library:
    """Defines the emulation namespace's ops with fastopt's schemas and loads the kernels."""
    library = torch.library.Library(NAMESPACE, "DEF")
    # The op table's own schema strings: torch prints `Tensor(a!)?[]` as `Tensor?(a!)[]`,
    # which its parser refuses.
    table = {op.name: op.schema for op in STEP_OPS}
    for name in OPS:
        schema = table.get(name) or str(getattr(torch.ops.fastopt, name).default._schema)
        library.define(schema.removeprefix("fastopt::"))
    path = library_path()
    if path is None:
        raise RuntimeError("fastopt/_C_cuda_emulation was not built")
    torch.ops.load_library(str(path))
    return library  # kept alive: the definitions live as long as it does


@contextlib.contextmanager
def emulated_cuda_kernels() -> Iterator[None]:
    """Within: the fastopt optimizer ops run their CUDA kernels, emulated, on CPU tensors."""
    _load()
    with warnings.catch_warnings(), torch.library._scoped_library("fastopt", "IMPL") as lib:
        # torch warns once that a registered kernel is being overridden: that is the point.
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel")
        for name, keys in OPS.items():
            emulated = getattr(getattr(torch.ops, NAMESPACE), name).default
            for key in keys:
                lib.impl(name, emulated, key)
        yield
