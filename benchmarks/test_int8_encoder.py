"""A whole transformer encoder on the CPU, int8: fastopt's `quantize_` against torch.ao's
`quantize_dynamic` (fbgemm, the anchor), with the fp32 model for reference.

The model has the shapes of a small sentence transformer (MiniLM-L6: 6 post-LN layers, hidden
384, 12 heads, FFN 1536 with GELU; separate query, key and value projections) with random
weights, run on batch 8 x 128 tokens (1024 token rows). Both converters replace every
``nn.Linear`` (six per layer); attention, softmax and LayerNorm stay in fp32 in both. fastopt's
``quantize_`` runs the FFN's GELU in its first layer's epilogue (its default); the table also
gives it without that fusion, and with ``fuse_shared_inputs=True`` (query, key and value as one
int8 GEMM).

Run (not part of the default test run):
    python -m pytest benchmarks/test_int8_encoder.py -s
It prints two tables, all measured in this process: the whole forward (medians of interleaved
rounds, so that the machine's drift reaches every model alike, with the error against the fp64
model) and each linear layer of one encoder layer alone (and the two fused blocks), in GOP/s
(2 * M * N * K operations per call), fastopt's also as a share of the int8 ceilings
(fastopt.benchmarking.int8_peak).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastopt.benchmarking import interleaved_medians
from fastopt.benchmarking.int8_peak import ceiling_line, int8_gemm_probe_gops, int8_peak_gops
from fastopt.nn import Int8Linear, Int8LinearGroup, quantize_

LAYERS, HIDDEN, HEADS, FFN = 6, 384, 12, 1536
BATCH, SEQ = 8, 128
FP32, AO, FASTOPT = "fp32 model", "torch.ao quantize_dynamic", "fastopt quantize_"
UNFUSED = "fastopt quantize_(fuse_activations=False)"
SHARED = "fastopt quantize_(fuse_shared_inputs=True)"


class EncoderLayer(nn.Module):
    """A BERT-style post-LN encoder layer: self-attention and a GELU FFN, each in a residual
    branch followed by LayerNorm."""

    def __init__(self, hidden: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
        self.ffn_norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.heads, hidden // self.heads).transpose(1, 2)

        q, k, v = (split_heads(layer(x)) for layer in (self.query, self.key, self.value))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape)
        x = self.attention_norm(x + self.attention_output(attended))
        return self.ffn_norm(x + self.ffn(x))


def encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(EncoderLayer(HIDDEN, HEADS, FFN) for _ in range(LAYERS))).eval()


def ao_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated, still the anchor
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value.double() - reference).norm() / reference.norm()).item()


def linear_shapes() -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear layer of one encoder layer."""
    layer = EncoderLayer(HIDDEN, HEADS, FFN)
    return {
        name: (module.in_features, module.out_features)
        for name, module in layer.named_modules()
        if isinstance(module, nn.Linear)
    }


@pytest.fixture(scope="module")
def models():
    fp32 = encoder()
    return {
        FP32: fp32,
        AO: ao_dynamic(fp32),
        FASTOPT: quantize_(copy.deepcopy(fp32)),
        UNFUSED: quantize_(copy.deepcopy(fp32), fuse_activations=False),
        SHARED: quantize_(copy.deepcopy(fp32), fuse_shared_inputs=True),
    }


def test_int8_encoder(models, capsys):
    x = torch.randn(BATCH, SEQ, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = copy.deepcopy(models[FP32]).double()(x.double())
        errors = {name: relative_error(model(x), reference) for name, model in models.items()}
        medians = interleaved_medians(
            {name: (lambda model=model: model(x)) for name, model in models.items()},
            "cpu",
            repeats=20,
        )
    # The int8 models quantize the same layers: fastopt's per-token scales must not be less
    # accurate than torch.ao's per-tensor ones.
    assert all(errors[name] <= errors[AO] for name in (FASTOPT, UNFUSED, SHARED)), errors
    lines = [
        f"\nEncoder: {LAYERS} layers, hidden {HIDDEN}, FFN {FFN}, {HEADS} heads, batch {BATCH} x "
        f"{SEQ} tokens; {torch.get_num_threads()} threads, torch {torch.__version__}",
        "| model | median ms | vs fp32 | vs torch.ao | rel. error vs fp64 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, ms in medians.items():
        lines.append(
            f"| {name} | {ms:.2f} | {medians[FP32] / ms:.2f}x | {medians[AO] / ms:.2f}x | "
            f"{errors[name]:.2e} |"
        )
    with capsys.disabled():
        print("\n".join(lines))


FUSED = "fastopt fused"
BLOCKS = [*linear_shapes(), "query+key+value", "ffn.0+GELU"]


def block_calls(name: str, x: torch.Tensor) -> tuple[dict, int, str]:
    """The contenders of one block of an encoder layer on `x` (a linear layer alone; the three
    projections of one input; the first FFN layer and its GELU), its operations per call, and
    its shape."""
    torch.manual_seed(0)
    rows = x.shape[0]
    if name == "query+key+value":
        linears = [nn.Linear(HIDDEN, HIDDEN) for _ in range(3)]
        ao = [ao_dynamic(nn.Sequential(linear)) for linear in linears]
        int8 = [Int8Linear.from_float(linear) for linear in linears]
        parts = Int8LinearGroup.from_float(linears).parts()
        calls = {
            FP32: lambda: [linear(x) for linear in linears],
            AO: lambda: [layer(x) for layer in ao],
            FASTOPT: lambda: [layer(x) for layer in int8],
            FUSED: lambda: [part(x) for part in parts],
        }
        return calls, 3 * 2 * rows * HIDDEN * HIDDEN, f"3 x {rows}x{HIDDEN} -> {HIDDEN}"
    in_features, out_features = linear_shapes()[name.removesuffix("+GELU")]
    linear = nn.Linear(in_features, out_features)
    ao, int8 = ao_dynamic(nn.Sequential(linear)), Int8Linear.from_float(linear)
    calls = {FP32: lambda: linear(x), AO: lambda: ao(x), FASTOPT: lambda: int8(x)}
    if name.endswith("+GELU"):
        fused = Int8Linear.from_float(linear, activation="gelu")
        calls = {label: (lambda call=call: F.gelu(call())) for label, call in calls.items()}
        calls[FUSED] = lambda: fused(x)
    return calls, 2 * rows * in_features * out_features, f"{rows}x{in_features} -> {out_features}"


@pytest.fixture(scope="module")
def ceilings() -> tuple[float, float, str]:
    """The int8 peak and the in-cache probe in GOP/s, and the line that states them."""
    return int8_peak_gops(), int8_gemm_probe_gops(), ceiling_line()


@pytest.mark.parametrize("name", BLOCKS)
def test_int8_encoder_linear(name, ceilings, capsys):
    peak, probe, line = ceilings
    x = torch.randn(BATCH * SEQ, FFN if name == "ffn.2" else HIDDEN)
    calls, ops, shape = block_calls(name, x)
    with torch.inference_mode():
        medians = interleaved_medians(calls, "cpu", repeats=30)
    cells = []
    for label, ms in medians.items():
        gops = ops / ms / 1e6
        share = f" ({gops / peak:.0%} of peak, {gops / probe:.0%} of probe)" if peak else ""
        cells.append(f"{label}: {ms:.3f} ms, {gops:.0f} GOP/s{share if 'fastopt' in label else ''}")
    best = min(ms for label, ms in medians.items() if "fastopt" in label)
    with capsys.disabled():
        if name == BLOCKS[0]:
            print(f"\n{line}")
        print(
            f"\n| {name} | {shape} | {' | '.join(cells)} | "
            f"fastopt vs torch.ao {medians[AO] / best:.2f}x |"
        )
