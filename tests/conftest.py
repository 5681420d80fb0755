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

from helpers import cuda_emulation  # noqa: E402
from helpers.cpu_isa import supported_cpu_isas  # noqa: E402
from helpers.cuda import ON_CUDA_KERNELS, cuda_kernels  # noqa: E402

from fastopt import _extension  # noqa: E402


def pytest_report_header() -> list[str]:
    """Says at the top of every run which of fastopt's kernels the tests can reach: a build
    without the CUDA extension (FASTOPT_CUDA=0) turns every CUDA and emulation test into a skip,
    which the skip count alone makes easy to miss."""
    cuda = (
        "on the GPU"
        if _extension.has_kernels("cuda") and torch.cuda.is_available()
        else "emulated on the CPU"
        if cuda_emulation.available()
        else f"NOT TESTED ({_extension._load_errors.get('cuda', 'emulation not built')})"
    )
    return [f"fastopt kernels: CPU ({', '.join(supported_cpu_isas())}); CUDA optimizers {cuda}"]


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


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=ON_CUDA_KERNELS)])
def device(request) -> Iterator[str]:
    """Runs the test with fastopt's CPU kernels and with its CUDA kernels (on a GPU, or emulated
    on the CPU without one; see `helpers.cuda.cuda_kernels`). Gives the device for the tensors."""
    if request.param == "cuda":
        with cuda_kernels() as kernel_device:
            yield kernel_device
    else:
        yield request.param
