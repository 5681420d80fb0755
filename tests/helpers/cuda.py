"""The marks and the guards of the tests that run on CUDA, or on fastopt's CUDA kernels emulated
on the CPU (helpers/cuda_emulation.py) where there is no GPU."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from fastopt import _extension
from helpers import cuda_emulation

# The marks of a test that needs a CUDA GPU itself (graphs, streams, CUDA tensors next to CPU
# ones, several GPUs): selected by `-m cuda`, and skipped, with the reason said, without a GPU.
ON_CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# The marks of a test (or a test's case) of fastopt's CUDA kernels: run on a GPU where there is
# one, else on the CPU through their emulation (`cuda_kernels`).
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
    emulated thread by thread."""
    if torch.cuda.is_available():
        with checked_cuda():
            yield "cuda"
    else:
        with cuda_emulation.emulated_cuda_kernels():
            yield "cpu"


@contextlib.contextmanager
def allow_tf32(enabled: bool) -> Iterator[None]:
    """Runs the block with TF32 matmuls (``torch.backends.cuda.matmul.allow_tf32``, which the
    Triton launchers read) on or off, restoring the setting after."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
