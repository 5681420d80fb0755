"""The marks and the guard of the tests that run on CUDA."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from fastopt import _extension

# The marks of a CUDA test (or of a test's CUDA case): selected by `-m cuda`, and skipped, with
# the reason said, where there is no GPU.
ON_CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
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
