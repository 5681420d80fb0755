"""Torch-eager references for the int8 tests: fake quantization with the kernels' exact rules
(per-row scale max|v| / 127, 1 for a zero row; round half to even; int32-exact sums)."""

from __future__ import annotations

import torch
from torch import Tensor


def quantize_rows(v: Tensor) -> tuple[Tensor, Tensor]:
    """int8-valued float rows of `v` (fp32) and their fp32 scales, [..., 1]."""
    amax = v.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(v / scale).clamp(-127, 127), scale


def fake_quant_linear(
    x: Tensor,
    weight: Tensor,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    input_scale: Tensor | None = None,
    quantize_input: bool = True,
) -> Tensor:
    """What `fastopt.int8_linear` computes, in torch eager: `weight` is the int8 [N, K] weight."""
    v = x.float() * input_scale if input_scale is not None else x.float()
    if quantize_input:
        q, row_scale = quantize_rows(v)
        sums = (
            q.double() @ weight.double().T
        ).float()  # exact integers, rounded once like cvtdq2ps
        y = sums * row_scale * weight_scale
    else:
        y = (v.double() @ weight.double().T).float() * weight_scale
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def relative_error(value: Tensor, reference: Tensor) -> float:
    """||value - reference|| / ||reference|| in fp64 (Frobenius norms)."""
    reference = reference.double()
    return ((value.double() - reference).norm() / reference.norm()).item()
