"""The Int8Linear benchmark: a 4096x4096 layer, fastopt's Int8Linear (dynamic W8A8, and
weight-only mode) against fp32 `nn.Linear` and `torch.ao.quantization.quantize_dynamic`
(fbgemm, per-tensor activations; CPU only) on the same weights and inputs in one process, at
batch 1, 16 and 256, with each layer's relative error against fp64 `F.linear`.

The cases and the table are shared by `python -m fastopt bench` (interleaved medians) and
`benchmarks/test_int8_linear.py` (pytest-benchmark rounds). At small batches the layer streams
its weight once per call, so the table also gives the weight's bytes per second beside the
machine's memory read bandwidth (the roofline of those rows).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Int8Linear
from .measurement import Measurement
from .timing import interleaved_medians, median_ms

FEATURE = "Int8Linear"
FEATURES = 4096
BATCHES = [1, 16, 256]
QUICK_BATCHES = [1, 16]
FP32, AO, FASTOPT = "fp32 nn.Linear", "torch.ao dynamic int8", "fastopt Int8Linear"
WEIGHT_ONLY = "fastopt Int8Linear weight_only"
LAYERS = [FP32, AO, FASTOPT, WEIGHT_ONLY]
ANCHORS = (FP32, AO)
# Bytes of weight each layer reads per call: int8 weights, or fp32 ones.
_WEIGHT_BYTES = {FP32: 4, AO: 1, FASTOPT: 1, WEIGHT_ONLY: 1}

# (device, batch) -> {layer: (median ms, relative error)}
Results = dict[tuple[str, int], dict[str, tuple[float, float]]]


def ao_dynamic(linear: nn.Linear) -> nn.Module:
    """torch.ao's dynamic int8 twin of `linear` (fbgemm, per-tensor activation scale)."""
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated, still the anchor
        warnings.simplefilter("ignore")
        model = nn.Sequential(linear)
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def build_layers(device: str, features: int = FEATURES) -> tuple[nn.Linear, dict[str, nn.Module]]:
    """The fp32 layer (seed 0) and every contender built from it; torch.ao on the CPU only."""
    torch.manual_seed(0)
    linear = nn.Linear(features, features).to(device)
    layers = {
        FP32: linear,
        FASTOPT: Int8Linear.from_float(linear),
        WEIGHT_ONLY: Int8Linear.from_float(linear, mode="weight_only"),
    }
    if torch.device(device).type == "cpu":  # fbgemm runs on the CPU only
        layers[AO] = ao_dynamic(linear)
    return linear, layers


def make_input(batch: int, features: int, device: str) -> torch.Tensor:
    """The Gaussian input of one batch size, the same for every layer."""
    return torch.randn(batch, features, generator=torch.Generator().manual_seed(batch)).to(device)


@torch.no_grad()
def relative_error(module: nn.Module, linear: nn.Linear, x: torch.Tensor) -> float:
    """||module(x) - y|| / ||y||, y the fp64 `F.linear` on the float weights."""
    reference = F.linear(x.double(), linear.weight.double(), linear.bias.double())
    return ((module(x).double() - reference).norm() / reference.norm()).item()


def run(
    device: str, batches: list[int], repeats: int = 10, features: int = FEATURES
) -> tuple[Results, float]:
    """Every layer at every batch size, timed in interleaved rounds, with its error; and the
    machine's memory read bandwidth in GB/s."""
    linear, layers = build_layers(device, features)
    results: Results = {}
    with torch.no_grad():
        for batch in batches:
            x = make_input(batch, features, device)
            calls = {name: functools.partial(module, x) for name, module in layers.items()}
            times = interleaved_medians(calls, device, repeats)
            results[(device, batch)] = {
                name: (ms, relative_error(layers[name], linear, x)) for name, ms in times.items()
            }
    return results, read_bandwidth(device)


def read_bandwidth(device: str, numel: int = 64 * 2**20) -> float:
    """GB/s of reading a 256 MB fp32 buffer (a sum over it): the memory bound of a layer that
    streams its weight once per call. A weight that fits the last-level cache (16 MiB of int8
    does on large server CPUs) can be read faster than this between calls."""
    buffer = torch.ones(numel, device=device)
    return 4 * numel / median_ms(buffer.sum, device) / 1e6


def format_table(results: Results, device: str, features: int = FEATURES) -> str:
    """The markdown table of `device`'s rows: median ms, speedups over fp32 and torch.ao, the
    weight's GB/s, the GOP/s (2 * batch * features^2 per call), the relative error and its ratio
    to torch.ao's."""
    lines = [
        "| batch | layer | median ms | vs fp32 | vs torch.ao | weight GB/s | GOP/s | rel. error "
        "| error vs torch.ao |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nan = float("nan")
    for (dev, batch), rows in sorted(results.items()):
        if dev != device:
            continue
        fp32_ms = rows[FP32][0] if FP32 in rows else nan
        ao_ms, ao_err = rows.get(AO, (nan, nan))
        for name, (ms, err) in rows.items():
            weight_gb_per_s = _WEIGHT_BYTES[name] * features * features / ms / 1e6
            gops = 2 * batch * features * features / ms / 1e6
            lines.append(
                f"| {batch} | {name} | {ms:.3f} | {fp32_ms / ms:.2f}x | {ao_ms / ms:.2f}x | "
                f"{weight_gb_per_s:.1f} | {gops:.0f} | {err:.2e} | {err / ao_err:.2f}x |"
            )
    return "\n".join(lines)


def measurements(results: Results) -> list[Measurement]:
    """The figure's view of `results`: one group per device and batch size."""
    return [
        Measurement(FEATURE, f"{device}, batch {batch}", name, ms, name in ANCHORS)
        for (device, batch), rows in sorted(results.items())
        for name, (ms, _) in rows.items()
    ]


def measurement_from_pytest(params: dict, ms: float) -> Measurement:
    """The Measurement of one `benchmarks/test_int8_linear.py` entry of a --benchmark-json file."""
    name = params["layer"]
    return Measurement(
        FEATURE, f"{params['device']}, batch {params['batch']}", name, ms, name in ANCHORS
    )
