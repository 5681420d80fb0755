"""`python -m fastopt selftest`: it passes here, covers every kernel, and catches a wrong one."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import fastopt
from fastopt import selftest


def test_selftest_passes_on_this_machine_and_says_what_it_did_not_check():
    done = subprocess.run(
        [sys.executable, "-m", "fastopt", "selftest"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert ", 0 failed" in done.stdout
    if not torch.cuda.is_available():
        assert "not checked: cuda (C++ and Triton kernels): no GPU visible" in done.stdout
    kernels = {line.split("|")[0].strip() for line in done.stdout.splitlines() if "|" in line}
    for op in ("adam_step_", "rmsprop_step_", "adagrad_step_", "adadelta_step_"):
        assert any(k.startswith(op) for k in kernels), op
    for kernel in ("sparse_adagrad_step_", "int8_linear (dynamic)", "blocksparse_linear"):
        assert any(k.startswith(kernel) for k in kernels), kernel
    # The int8 rows name the GEMM variant each instruction set runs.
    best = fastopt._extension.cpu_module().best_cpu_isa()
    variant = {"amx": "amx", "avx512_vnni": "vnni", "avx512": "avx2", "avx2": "avx2"}
    expected = f"cpu ({best}, int8 {variant.get(best, 'portable')})"
    assert any(expected in line and "int8_linear" in line for line in done.stdout.splitlines())


def _adam_with_lr_off_by(factor: float) -> type:
    """FusedAdam with its lr multiplied by `factor`: a kernel bug the selftest must catch."""

    class WrongAdam(fastopt.FusedAdam):
        def __init__(self, params, lr, **kwargs):
            super().__init__(params, lr=lr * factor, **kwargs)

    return WrongAdam


# A 0.1% error in fp32 and fp64; in bf16 and fp16, whose params round by more than that, 30%.
@pytest.mark.parametrize(
    "dtype, factor",
    [(torch.float32, 1.001), (torch.float64, 1.001), (torch.float16, 1.3), (torch.bfloat16, 1.3)],
)
def test_a_wrong_optimizer_step_fails(monkeypatch, dtype, factor):
    name = "adam_step_ (Adam, amsgrad)"
    _, reference, options = selftest.OPTIMIZERS[name]
    wrong = (_adam_with_lr_off_by(factor), reference, options)
    monkeypatch.setitem(selftest.OPTIMIZERS, name, wrong)
    result = selftest.check_optimizer(name, "cpu", dtype, torch.Generator().manual_seed(0))
    assert not result.ok, result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_one_percent_int8_scale_error_fails(monkeypatch, dtype):
    from_float = fastopt.nn.Int8Linear.from_float

    def off_by_one_percent(*args, **kwargs):
        layer = from_float(*args, **kwargs)
        layer.weight_scale.mul_(1.01)
        return layer

    monkeypatch.setattr(fastopt.nn.Int8Linear, "from_float", off_by_one_percent)
    result = selftest.check_int8_linear("dynamic", "cpu", dtype, torch.Generator().manual_seed(0))
    assert not result.ok, result
