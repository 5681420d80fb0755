"""The emulation of the CUDA optimizer kernels that the GPU tests use without a GPU
(tests/helpers/cuda_emulation.py): it is built wherever the CUDA kernels are, and its routing of
the ops is in place exactly while asked for."""

from __future__ import annotations

import pytest
import torch
from helpers import cuda_emulation
from helpers.rng import generator

import fastopt
from fastopt import _extension


def test_the_emulation_is_built_with_the_cuda_kernels():
    """Built with the CUDA extension unless FASTOPT_CUDA_EMULATION=0 said otherwise, so the GPU
    tests never skip unnoticed on a machine without a GPU."""
    info = _extension.build_info()
    assert info.get("CUDA_EMULATION_BUILT", False) == cuda_emulation.available()
    if info.get("CUDA_BUILT"):
        assert "CUDA_EMULATION_BUILT" in info


def _cpu_kernel(op: str, key: str = "CPU") -> str:
    """The line of torch's dispatch table that names op's kernel for `key`."""
    table = torch._C._dispatch_dump(f"fastopt::{op}")
    return next(line for line in table.splitlines() if line.startswith(f"{key}:"))


@pytest.mark.skipif(not cuda_emulation.available(), reason="the emulation is not built")
def test_the_ops_run_the_emulated_kernels_only_within_the_context():
    before = {op: _cpu_kernel(op) for op in cuda_emulation.OPS}
    with cuda_emulation.emulated_cuda_kernels():
        for op, keys in cuda_emulation.OPS.items():
            for key in keys:
                assert "python" in _cpu_kernel(op, key).lower(), (op, key)
        params = [torch.randn(9, generator=generator(0))]
        grads = [torch.randn(9, generator=generator(1))]
        steps = [torch.zeros(())]
        fastopt.functional.adagrad_step_(params, grads, [torch.zeros(9)], steps, lr=0.1)
        assert steps[0].item() == 1.0
    assert {op: _cpu_kernel(op) for op in cuda_emulation.OPS} == before
