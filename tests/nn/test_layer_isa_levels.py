"""The layers' CPU kernels under every instruction set level this CPU supports: the level chooses
the int8 GEMM variant (asserted), and every row count a micro-kernel handles gives exactly the
torch-eager fake quantization, in float32, bfloat16 and float16 alike. Block-sparse runs under
every level too."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers.blocksparse_reference import assert_close_to_reference, make_case, make_mask
from helpers.cpu_isa import ISA_LEVELS, supported_cpu_isas
from helpers.int8_reference import fake_quant_linear
from helpers.rng import generator

import fastopt.functional as F
from fastopt import _extension

# The int8 GEMM each level runs: AVX-512 without VNNI has no faster int8 product than AVX2's.
INT8_VARIANT = {
    "baseline": "portable",
    "avx2": "avx2",
    "avx512": "avx2",
    "avx512_vnni": "vnni",
    "amx": "amx",
}
# 1..33 rows: every row count of a 32-row tile (AMX's 16 and 32, VNNI's 1..8, AVX2's 1 and 2, the
# weight-only kernels' 8, 4, 2, 1), and a second tile.
ROW_COUNTS = range(1, 34)
# K: 64 groups of 4 (whole AMX steps of 16 groups), and 131 (an AMX step, a VNNI K tail, and a
# partial group). N = 48: a panel of two blocks and one of one.
IN_FEATURES = [256, 131]
OUT_FEATURES = 48


def _random_int8(shape, seed) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=generator(seed), dtype=torch.int8)


def test_every_level_chooses_its_int8_variant(cpu_isa):
    assert _extension.cpu_module().int8_kernels() == INT8_VARIANT[cpu_isa]


def test_every_level_has_an_int8_variant():
    assert tuple(INT8_VARIANT) == ISA_LEVELS


@pytest.mark.parametrize("k", IN_FEATURES)
def test_int8_mm_every_row_count_is_exact(cpu_isa, k):
    weight = _random_int8((OUT_FEATURES, k), seed=k)
    packed, compensation = F.pack_int8_weight(weight)
    for rows in ROW_COUNTS:
        a = _random_int8((rows, k), seed=rows)
        expected = (a.long() @ weight.long().T).int()
        assert torch.equal(F.int8_mm(a, packed, compensation, k), expected), rows


def _layer(k: int, dtype: torch.dtype, seed: int):
    """An int8 layer's tensors: int8 weight, its packing, scales, a bias of `dtype`, and a
    per-input-channel scale (SmoothQuant), all from fresh random draws."""
    weight = _random_int8((OUT_FEATURES, k), seed=seed)
    packed, compensation = F.pack_int8_weight(weight)
    weight_scale = torch.rand(OUT_FEATURES, generator=generator(seed + 1)) / 100 + 1e-3
    bias = torch.randn(OUT_FEATURES, generator=generator(seed + 2)).to(dtype)
    input_scale = torch.rand(k, generator=generator(seed + 3)) + 0.5
    return weight, packed, compensation, weight_scale, bias, input_scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("k", IN_FEATURES)
def test_dynamic_int8_linear_is_exactly_fake_quantization(cpu_isa, k, dtype):
    """W8A8 in any dtype is the same fp32 arithmetic as torch's fake quantization, rounded once to
    the output dtype: equal bit for bit, so a scale off by one part in 10^6 fails."""
    weight, packed, compensation, weight_scale, bias, input_scale = _layer(k, dtype, seed=k)
    for rows in ROW_COUNTS:
        x = torch.randn(rows, k, generator=generator(rows)).to(dtype)
        y = torch.ops.fastopt.int8_linear(
            x, packed, compensation, k, weight_scale, bias, input_scale, True
        )
        expected = fake_quant_linear(x, weight, weight_scale, bias, input_scale)
        assert y.dtype == dtype
        assert torch.equal(y, expected), rows


@pytest.mark.parametrize("k", IN_FEATURES)
def test_weight_only_every_row_count(cpu_isa, k):
    """Weight-only sums fp32 products in the kernel's order: fp32 rounding from the reference."""
    weight, packed, compensation, weight_scale, bias, input_scale = _layer(k, torch.float32, k)
    for rows in ROW_COUNTS:
        x = torch.randn(rows, k, generator=generator(rows))
        y = torch.ops.fastopt.int8_linear(
            x, packed, compensation, k, weight_scale, bias, input_scale, False
        )
        expected = fake_quant_linear(x, weight, weight_scale, bias, input_scale, False)
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5, msg=f"{rows} rows")


def test_blocksparse_under_every_level(cpu_isa):
    mask = make_mask("random", 3, 2, torch.Generator().manual_seed(5))
    case = make_case(mask, 32, (29,), torch.float32, seed=6)
    leaves = {
        "input": case.x.clone().requires_grad_(),
        "values": case.values.clone().requires_grad_(),
        "bias": case.bias.clone().requires_grad_(),
    }
    index = F.index_from_mask(case.mask)
    out = F.blocksparse_linear(leaves["input"], leaves["values"], index, leaves["bias"])
    out.backward(case.grad_out)
    assert_close_to_reference({"out": out.detach()} | {k: v.grad for k, v in leaves.items()}, case)


def _fresh_process(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
        text=True, timeout=120, check=True,
    )  # fmt: skip
    return out.stdout


@pytest.mark.parametrize("level", supported_cpu_isas())
def test_fastopt_cpu_isa_reaches_the_int8_kernels(level):
    """FASTOPT_CPU_ISA caps every kernel, the int8 GEMM included (VNNI on an AMX machine, ...),
    and `python -m fastopt info` reports the variant in use."""
    code = "import fastopt.__main__ as m; m.info()"
    info = _fresh_process(code, FASTOPT_CPU_ISA=level)
    assert f"CPU kernels: {level} in use" in info
    assert f"CPU int8 GEMM: {INT8_VARIANT[level]}" in info
