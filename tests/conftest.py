"""The fixtures of fastopt's tests (the helpers are in tests/helpers/)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# Without a GPU, the Triton kernels run on CPU tensors in Triton's interpreter. The variable must
# be set before any module defining @triton.jit kernels is imported, so before fastopt is (the
# helpers import it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers.cpu_isa import supported_cpu_isas  # noqa: E402
from helpers.cuda import ON_CUDA, checked_cuda  # noqa: E402

from fastopt import _extension  # noqa: E402


@pytest.fixture(params=supported_cpu_isas())
def cpu_isa(request) -> str:
    """Runs the test once per instruction set this CPU supports, restoring the choice after."""
    module = _extension.cpu_module()
    previous = module.set_cpu_isa(request.param)
    try:
        assert module.active_cpu_isa() == request.param
        yield request.param
    finally:
        module.set_cpu_isa(previous)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=ON_CUDA)])
def device(request) -> Iterator[str]:
    """Runs the test on the CPU and on CUDA (the CUDA case skipped without a GPU)."""
    if request.param == "cuda":
        with checked_cuda():
            yield request.param
    else:
        yield request.param
