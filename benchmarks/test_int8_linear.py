"""pytest-benchmark runs of a 4096x4096 linear layer: fastopt's Int8Linear (dynamic W8A8, and
weight-only mode for reference) against fp32 `nn.Linear` and
`torch.ao.quantization.quantize_dynamic` (fbgemm, per-tensor activations), on the same weights
and inputs in one process, at batch 1, 16 and 256.

Run (not part of the default test run):
    python -m pytest benchmarks/test_int8_linear.py --benchmark-group-by=param:batch
Each row also records the relative error against fp64 `F.linear` on the float weights; at the end
the run prints the table (median ms, speedups, errors), all measured in this process.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastopt.nn import Int8Linear

FEATURES = 4096
BATCHES = [1, 16, 256]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FP32, AO, FASTOPT = "fp32 nn.Linear", "torch.ao dynamic int8", "fastopt Int8Linear"
WEIGHT_ONLY = "fastopt Int8Linear weight_only"


def _ao_dynamic(linear: nn.Linear) -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated, still the anchor
        warnings.simplefilter("ignore")
        model = nn.Sequential(linear)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _layers(device):
    torch.manual_seed(0)
    linear = nn.Linear(FEATURES, FEATURES).to(device)
    layers = {
        FP32: linear,
        FASTOPT: Int8Linear.from_float(linear),
        WEIGHT_ONLY: Int8Linear.from_float(linear, mode="weight_only"),
    }
    if device == "cpu":  # fbgemm runs on the CPU only
        layers[AO] = _ao_dynamic(linear)
    return linear, layers


_RESULTS: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}


@pytest.fixture(scope="module")
def layers():
    return {device: _layers(device) for device in DEVICES}


@pytest.fixture(scope="module", autouse=True)
def summary(request):
    """Prints each device's table once every benchmark of this module has run."""
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for device in DEVICES:
            reporter.write_line(
                f"\nInt8Linear {FEATURES}x{FEATURES} on {device}, torch {torch.__version__}"
            )
            reporter.write_line(format_table(device))


def format_table(device: str) -> str:
    lines = [
        "| batch | layer | median ms | vs fp32 | vs torch.ao | rel. error | error vs torch.ao |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for (dev, batch), rows in sorted(_RESULTS.items()):
        if dev != device:
            continue
        fp32_ms = rows[FP32][0] if FP32 in rows else float("nan")
        ao_ms, ao_err = rows.get(AO, (float("nan"), float("nan")))
        for name, (ms, err) in rows.items():
            lines.append(
                f"| {batch} | {name} | {ms:.3f} | {fp32_ms / ms:.2f}x | {ao_ms / ms:.2f}x | "
                f"{err:.2e} | {err / ao_err:.2f}x |"
            )
    return "\n".join(lines)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("layer", [FP32, AO, FASTOPT, WEIGHT_ONLY])
def test_int8_linear(benchmark, layers, device, batch, layer):
    linear, by_name = layers[device]
    if layer not in by_name:
        pytest.skip(f"{layer} has no {device} kernels")
    module = by_name[layer]
    x = torch.randn(batch, FEATURES, generator=torch.Generator().manual_seed(batch)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        module(x)
        sync()

    with torch.no_grad():
        reference = F.linear(x.double(), linear.weight.double(), linear.bias.double())
        y = module(x)
        error = ((y.double() - reference).norm() / reference.norm()).item()
        benchmark.pedantic(run, rounds=30 if batch < 256 else 10, warmup_rounds=3)
    ms = benchmark.stats.stats.median * 1e3
    _RESULTS.setdefault((device, batch), {})[layer] = (ms, error)
    benchmark.extra_info.update({"relative_error": error})
