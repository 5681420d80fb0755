"""The compiled extension: loading checks, `python -m fastopt`, the benchmark helpers, and the
two ways into the ops (the unboxed eager entry and torch.ops) giving the same result."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers.rng import generator

import fastopt
from fastopt import _extension, benchmarking, functional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extension_built_for_another_torch_is_refused(monkeypatch):
    monkeypatch.setattr(_extension._build_info, "TORCH_VERSION", "1.0.0")
    with pytest.raises(ImportError, match=r"built against torch 1\.0\.0.*--force-reinstall"):
        _extension._check_torch_version()


def test_build_info_names_this_torch():
    assert _extension.build_info()["TORCH_VERSION"] == torch.__version__


def test_python_m_fastopt_info():
    out = subprocess.run(
        [sys.executable, "-m", "fastopt", "info"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    isa = _extension.cpu_module().active_cpu_isa()
    assert f"torch {torch.__version__}" in out
    assert f"CPU kernels: {isa} in use" in out
    assert "CUDA kernels:" in out and "Triton" in out


@pytest.mark.parametrize("family", list(benchmarking.FAMILIES))
def test_benchmark_case_runs_and_formats(family):
    spec = benchmarking.FAMILIES[family]
    case = benchmarking.Case("t", "two tiny tensors", (100, 7))
    rows = benchmarking.run_case(spec, case, "cpu", repeats=1)
    assert [r.optimizer for r in rows] == list(spec.contenders)
    assert all(r.ms > 0 and r.roofline_ms > 0 for r in rows)
    fastest_torch = min(r.ms for r in rows if r.optimizer.startswith("torch"))
    assert all(r.torch_best_ms == fastest_torch for r in rows)
    table = benchmarking.format_table(rows)
    assert table.count("\n") == len(rows) + 1 and f"fastopt.Fused{spec.name}" in table


def test_mixed_sizes_sum_to_the_total():
    sizes = benchmarking.mixed_sizes(1_000_003, 37, seed=3)
    assert len(sizes) == 37 and sum(sizes) == 1_000_003 and min(sizes) >= 1


class _Subclass(torch.Tensor):
    """A tensor subclass: the eager entry declines it and torch.ops takes over."""


# torch.ops.fastopt.adam_step_'s arguments after its lists: lr 1e-2, betas (0.9, 0.99), eps,
# weight decay 0.1, and none of the optional inputs.
_ADAM_ARGUMENTS = (1e-2, None, 0.9, 0.99, 1e-8, 0.1, False, False, False, None, None, [], None,
                   0.0, [])  # fmt: skip


def _adam_inputs(seed: int, wrap=lambda t: t):
    gen = generator(seed)
    shapes = [(5,), (3, 4), (4097,)]
    params = [wrap(torch.randn(s, generator=gen)) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    exp_avgs = [torch.zeros(s) for s in shapes]
    exp_avg_sqs = [torch.zeros(s) for s in shapes]
    steps = [torch.zeros(()) for _ in shapes]
    return params, grads, exp_avgs, exp_avg_sqs, [], steps


@pytest.mark.parametrize("route", ["eager entry", "torch.ops", "subclass", "function mode"])
def test_both_routes_into_the_op_agree(route):
    kwargs = dict(lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    expected = _adam_inputs(0)
    torch.ops.fastopt.adam_step_(
        *expected,
        *_ADAM_ARGUMENTS,
    )
    if route == "eager entry":
        inputs = _adam_inputs(0)
        assert _extension.cpu_module().adam_step_(
            *inputs, *_ADAM_ARGUMENTS,
        ) is None  # fmt: skip
    elif route == "torch.ops":
        inputs = _adam_inputs(0)
        functional.adam_step_(*inputs, **kwargs)
    elif route == "subclass":
        inputs = _adam_inputs(0, wrap=lambda t: t.as_subclass(_Subclass))
        assert (
            _extension.cpu_module().adam_step_(
                *inputs,
                *_ADAM_ARGUMENTS,
            )
            is NotImplemented
        )
        functional.adam_step_(*inputs, **kwargs)
    else:
        inputs = _adam_inputs(0)

        class Mode(torch.overrides.TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return func(*args, **(kwargs or {}))

        with Mode():
            assert (
                _extension.cpu_module().adam_step_(
                    *inputs,
                    *_ADAM_ARGUMENTS,
                )
                is NotImplemented
            )
            functional.adam_step_(*inputs, **kwargs)
    for got_list, want_list in zip(inputs, expected, strict=True):
        for got, want in zip(got_list, want_list, strict=True):
            torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=0, atol=0)


def test_fastopt_exports():
    assert fastopt.FusedAdam.__module__ == "fastopt.optim.adam"
    assert set(fastopt.__all__) >= {"FusedAdam", "FusedAdamW", "functional"}


def test_a_checkout_without_built_kernels_says_how_to_build(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"No module named {name!r}")

    monkeypatch.setattr(_extension.importlib, "import_module", missing)
    fix = r"not built in place.*pip install --no-build-isolation -e \."
    with pytest.raises(ImportError, match=fix):
        _extension._import_binary("fastopt._C")


def test_a_cuda_extension_that_fails_to_load_leaves_the_cpu_kernels(monkeypatch):
    monkeypatch.setattr(_extension, "_loaded", {})
    monkeypatch.setattr(_extension, "_load_errors", {})
    monkeypatch.setattr(_extension._build_info, "CUDA_BUILT", True)
    real_import = _extension._import_binary

    def import_binary(name):
        if name == "fastopt._C_cuda":
            raise ImportError("undefined symbol: cudaSomething")
        return real_import(name)

    monkeypatch.setattr(_extension, "_import_binary", import_binary)
    _extension.load()
    assert _extension.has_kernels("cpu") and not _extension.has_kernels("cuda")
    with pytest.raises(RuntimeError, match="_C_cuda failed to load.*undefined symbol"):
        _extension.require_kernels(torch.device("cuda"), "x")


@pytest.mark.parametrize("name", ["grad_scale", "found_inf"])
def test_scaler_tensors_must_be_float32(name):
    inputs = _adam_inputs(1)
    before = [[t.clone() for t in tensors] for tensors in inputs]
    scalar = {name: torch.tensor(1.0 if name == "grad_scale" else 0.0, dtype=torch.float64)}
    with pytest.raises(RuntimeError, match=f"{name} must be float32, got Double"):
        functional.adam_step_(*inputs, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, **scalar)
    for got, want in zip(inputs, before, strict=True):
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
