"""Triton kernels of ``fastopt::int8_mm`` and ``fastopt::int8_linear`` (registered for CUDA), and
their launchers, plain functions of tensors that tests call on CPU tensors under
``TRITON_INTERPRET=1``.

They read the packed weight of ``fastopt.functional.int8.pack_int8_weight`` ([N/16, K/4, 16, 4]
int8, see csrc/layers/cpu/int8_tiles.h), so one layer moves between devices unchanged.
``tl.dot`` multiplies int8 tiles exactly into int32 (IMMA on the GPU), signed, so the
compensation that the CPU's VNNI kernel needs is only read for its shape here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _library
from . import configs
from .launch import checked_grid, device_guard


@triton.jit
def _packed_weight_tile(packed_ptr, groups, offs_k, offs_n, K, N):
    """The [BLOCK_K, BLOCK_N] tile w[n, k].T of the packed weight (0 outside [N, K]). The
    offsets are int64: a packed weight can pass 2 GiB, where int32 ones would wrap."""
    n = offs_n.to(tl.int64)
    k = offs_k.to(tl.int64)
    offset = (n[None, :] // 16) * groups * 64 + (k[:, None] // 4) * 64 + (n[None, :] % 16) * 4
    offset += k[:, None] % 4
    mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
    return tl.load(packed_ptr + offset, mask=mask, other=0)


@triton.jit
def _activate(y, GELU: tl.constexpr):
    """The epilogue's activation on the fp32 output tile: with GELU, torch's erf-form gelu."""
    if GELU:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    return y


@triton.jit
def _quantize_rows_kernel(
    x_ptr, input_scale_ptr, q_ptr, row_scale_ptr, K, HAS_INPUT_SCALE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One row per program: scale = max|v| / 127 (1 for a zero row), q = round(v / scale) with
    ties to even, v = x * input_scale in fp32: the CPU kernel's rule exactly. The divisions are
    div_rn, IEEE-rounded like the CPU's: Triton's fp32 `/` is approximate on a GPU."""
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + row * K + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_INPUT_SCALE:
            v = v * tl.load(input_scale_ptr + offs, mask=offs < K, other=0.0)
        amax = tl.maximum(amax, tl.abs(v))
    row_max = tl.max(amax, axis=0)
    scale = tl.where(row_max > 0, tl.math.div_rn(row_max, 127.0), 1.0)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        v = tl.load(x_ptr + row * K + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_INPUT_SCALE:
            v = v * tl.load(input_scale_ptr + offs, mask=offs < K, other=0.0)
        # Adding and subtracting 1.5 * 2^23 rounds |r| < 2^22 to an integer, ties to even.
        r = (tl.math.div_rn(v, scale) + 12582912.0) - 12582912.0
        q = tl.minimum(tl.maximum(r, -127.0), 127.0)
        tl.store(q_ptr + row * K + offs, q.to(tl.int8), mask=offs < K)
    tl.store(row_scale_ptr + row, scale)


@triton.jit
def _int8_gemm_kernel(
    a_ptr, packed_ptr, groups, row_scale_ptr, weight_scale_ptr, bias_ptr, out_ptr, M, N, K,
    DEQUANTIZE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out = a @ w.T in exact int32; with DEQUANTIZE, the epilogue applies both scales, the
    bias and the activation (GELU) and stores the output dtype instead."""
    # Row tiles on grid axis 0 (the unbounded one), in int64: M * K may pass 2**31.
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        a = tl.load(
            a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :], mask=a_mask, other=0
        )
        b = _packed_weight_tile(packed_ptr, groups, offs_k, offs_n, K, N)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    if DEQUANTIZE:
        row_scale = tl.load(row_scale_ptr + offs_m, mask=offs_m < M, other=0.0)
        weight_scale = tl.load(weight_scale_ptr + offs_n, mask=offs_n < N, other=0.0)
        y = acc.to(tl.float32) * row_scale[:, None] * weight_scale[None, :]
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y = _activate(y, GELU)
        tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + out_offs, acc, mask=out_mask)


@triton.jit
def _weight_only_kernel(
    x_ptr, input_scale_ptr, packed_ptr, groups, weight_scale_ptr, bias_ptr, out_ptr, M, N, K,
    HAS_INPUT_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """out = act((x * input_scale) @ (w * weight_scale).T + bias), the int8 weight widened to fp32
    in registers. The products are fp32 (not bf16 tensor-core ones): this kernel serves the small,
    memory-bound batches, and Triton's interpreter computes bf16 dots wrongly."""
    # Row tiles on grid axis 0 (the unbounded one), in int64: M * K may pass 2**31.
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x_offs = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        x = tl.load(x_ptr + x_offs, mask=x_mask, other=0.0).to(tl.float32)
        if HAS_INPUT_SCALE:
            x = x * tl.load(input_scale_ptr + offs_k, mask=offs_k < K, other=0.0)[None, :]
        w = _packed_weight_tile(packed_ptr, groups, offs_k, offs_n, K, N).to(tl.float32)
        acc += tl.dot(x, w, input_precision="ieee")
    y = acc * tl.load(weight_scale_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = _activate(y, GELU)
    out_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_offs = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    tl.store(out_ptr + out_offs, y.to(out_ptr.dtype.element_ty), mask=out_mask)


def gemm_grid(op: str, rows: int, n: int, config: configs.Config) -> tuple[int, int]:
    """(row tiles, column tiles) of the GEMM kernels: the rows, unbounded, on axis 0."""
    blocks = dict(config.blocks)
    grid = (triton.cdiv(rows, blocks["BLOCK_M"]), triton.cdiv(n, blocks["BLOCK_N"]))
    return checked_grid(op, grid, ("row tiles", "output feature tiles"))


def quantize_grid(op: str, rows: int) -> tuple[int]:
    """One program per row."""
    return checked_grid(op, (rows,), ("rows",))


def _launch_gemm(
    op, a, packed_weight, n, out, row_scale=None, weight_scale=None, bias=None, gelu=False
):
    rows, k = a.shape
    config = configs.int8_gemm(rows)
    grid = gemm_grid(op, rows, n, config)
    dequantize = row_scale is not None
    with device_guard(a.device):
        _int8_gemm_kernel[grid](
            a, packed_weight, packed_weight.shape[1], row_scale if dequantize else out,
            weight_scale if dequantize else out, bias if bias is not None else out, out, rows, n,
            k, DEQUANTIZE=dequantize, HAS_BIAS=bias is not None, GELU=gelu,
            **config.launch_options(),
        )  # fmt: skip


def int8_mm(input, packed_weight, weight_compensation, in_features):
    """``fastopt::int8_mm``: the exact int32 product of an int8 [M, K] input and the packed
    int8 weight."""
    _library.check_int8_mm(input, packed_weight, weight_compensation, in_features)
    n = weight_compensation.shape[0]
    out = torch.empty((input.shape[0], n), dtype=torch.int32, device=input.device)
    if out.numel() and in_features == 0:
        out.zero_()  # an empty sum
    elif out.numel():
        _launch_gemm("int8_mm", input.contiguous(), packed_weight.contiguous(), n, out)
    return out


def int8_linear(
    input,
    packed_weight,
    weight_compensation,
    in_features,
    weight_scale,
    bias,
    input_scale,
    quantize_input,
    activation="none",
):
    """``fastopt::int8_linear``: per-row int8 quantization, then the int8 GEMM with the
    dequantize + bias + activation epilogue (``quantize_input``), or the weight-only kernel."""
    _library.check_int8_linear(
        input,
        packed_weight,
        weight_compensation,
        in_features,
        weight_scale,
        bias,
        input_scale,
        activation,
    )
    gelu = activation == "gelu"
    k, n = input.shape[-1], weight_compensation.shape[0]
    rows = math.prod(input.shape[:-1])  # explicit: reshape(-1, 0) cannot infer it when K == 0
    x = input.reshape(rows, k).contiguous()
    out = torch.empty((rows, n), dtype=input.dtype, device=input.device)
    if out.numel() == 0:
        return out.view(*input.shape[:-1], n)
    if k == 0:  # no input features, as nn.Linear: act(the bias), or act(0) = 0
        if bias is not None:
            out.copy_(torch.nn.functional.gelu(bias) if gelu else bias.expand(rows, n))
        else:
            out.zero_()
        return out.view(*input.shape[:-1], n)
    # The kernels index every tensor as contiguous.
    packed_weight, weight_scale = packed_weight.contiguous(), weight_scale.contiguous()
    bias = bias.contiguous() if bias is not None else None
    input_scale = input_scale.contiguous() if input_scale is not None else None
    has_scale = input_scale is not None
    if quantize_input:
        q = torch.empty((rows, k), dtype=torch.int8, device=input.device)
        row_scale = torch.empty(rows, dtype=torch.float32, device=input.device)
        grid = quantize_grid("int8_linear", rows)
        with device_guard(x.device):
            _quantize_rows_kernel[grid](
                x, input_scale if has_scale else x, q, row_scale, k, HAS_INPUT_SCALE=has_scale,
                **configs.quantize_rows(k).launch_options(),
            )  # fmt: skip
        _launch_gemm("int8_linear", q, packed_weight, n, out, row_scale, weight_scale, bias, gelu)
    else:
        config = configs.weight_only(input.dtype, rows)
        grid = gemm_grid("int8_linear", rows, n, config)
        with device_guard(x.device):
            _weight_only_kernel[grid](
                x, input_scale if has_scale else x, packed_weight, packed_weight.shape[1],
                weight_scale, bias if bias is not None else x, out, rows, n, k,
                HAS_INPUT_SCALE=has_scale, HAS_BIAS=bias is not None, GELU=gelu,
                **config.launch_options(),
            )  # fmt: skip
    return out.view(*input.shape[:-1], n)
