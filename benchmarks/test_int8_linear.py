"""pytest-benchmark runs of a 4096x4096 linear layer: fastopt's Int8Linear (dynamic W8A8, and
weight-only mode for reference) against fp32 `nn.Linear` and
`torch.ao.quantization.quantize_dynamic` (fbgemm, per-tensor activations), on the same weights
and inputs in one process, at batch 1, 16 and 256.

The cases and the table are shared with `python -m fastopt bench`
(fastopt/benchmarking/int8_linear.py). Run (not part of the default test run):
    python -m pytest benchmarks/test_int8_linear.py --benchmark-group-by=param:batch
Each row also records the relative error against fp64 `F.linear` on the float weights; at the end
the run prints the table (median ms, speedups, errors), all measured in this process.
"""

from __future__ import annotations

import pytest
import torch

from fastopt.benchmarking import machine_description
from fastopt.benchmarking.int8_linear import (
    BATCHES,
    FEATURES,
    LAYERS,
    build_layers,
    format_table,
    make_input,
    relative_error,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

_RESULTS: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}


@pytest.fixture(scope="module")
def layers():
    return {device: build_layers(device) for device in DEVICES}


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """Prints each device's table once every benchmark of this module has run."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for device in DEVICES:
            reporter.write_line(
                f"\nInt8Linear {FEATURES}x{FEATURES} on {machine_description(device)}"
            )
            reporter.write_line(format_table(_RESULTS, device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer", LAYERS)
def test_int8_linear(benchmark, layers, device, batch, layer):
    linear, by_name = layers[device]
    if layer not in by_name:
        pytest.skip(f"{layer} has no {device} kernels")
    module = by_name[layer]
    x = make_input(batch, FEATURES, device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        module(x)
        sync()

    error = relative_error(module, linear, x)
    with torch.no_grad():
        benchmark.pedantic(run, rounds=30 if batch < 256 else 10, warmup_rounds=3)
    ms = benchmark.stats.stats.median * 1e3
    _RESULTS.setdefault((device, batch), {})[layer] = (ms, error)
    benchmark.extra_info.update({"relative_error": error})
