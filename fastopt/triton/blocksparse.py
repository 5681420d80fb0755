"""Triton kernels of the block-sparse linear products (the CUDA kernels of
``torch.ops.fastopt.blocksparse_linear*``; see ``fastopt.functional.blocksparse`` for the index
tensors).

- ``_dsd_kernel``: dense = dense x block-sparse. One program per (output block column, tile of
  rows) sums ``tl.dot(A[rows, block column], W block)`` over the entries of its index row. The
  forward pass walks the block-CSR index with each block transposed; grad_input walks the
  transposed index with the blocks as stored.
- ``_sdd_kernel``: the stored blocks of grad_Y^T X. One program per stored block sums over the
  rows (the batch) in steps of ``BLOCK_K``.

fp16 / bf16 / fp32 inputs, fp32 accumulation; fp32 uses TF32 when
``torch.backends.cuda.matmul.allow_tf32``. The launchers are plain functions of tensors: under
``TRITON_INTERPRET=1`` they run on CPU tensors (how the tests check them without a GPU).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._library import (
    check_blocksparse_linear,
    check_blocksparse_linear_grad_input,
    check_blocksparse_linear_grad_values,
)
from . import configs
from .launch import checked_grid, device_guard

__all__ = ["blocksparse_linear", "blocksparse_linear_grad_input", "blocksparse_linear_grad_values"]


@triton.jit
def _dsd_kernel(
    a_ptr,
    w_ptr,
    bias_ptr,
    out_ptr,
    offsets_ptr,
    indices_ptr,
    order_ptr,
    rows,
    a_width,
    out_width,
    stride_wk,
    stride_wn,
    HAS_BIAS: tl.constexpr,
    HAS_ORDER: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    # Row tiles on grid axis 0, the only one that takes more than 65535 programs; int64 before
    # the product, which passes 2**31 past that many rows.
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.program_id(1)
    offs_b = tl.arange(0, BLOCK)
    in_rows = offs_m[:, None] < rows
    w_tile = offs_b[:, None] * stride_wk + offs_b[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK), dtype=tl.float32)
    begin = tl.load(offsets_ptr + j)
    end = tl.load(offsets_ptr + j + 1)
    for e in range(begin, end):
        column = tl.load(indices_ptr + e)
        stored = tl.load(order_ptr + e) if HAS_ORDER else e
        a = tl.load(
            a_ptr + offs_m[:, None] * a_width + column * BLOCK + offs_b[None, :],
            mask=in_rows,
            other=0.0,
        )
        w = tl.load(w_ptr + stored.to(tl.int64) * BLOCK * BLOCK + w_tile)
        if DOT_IN_FP32:
            a, w = a.to(tl.float32), w.to(tl.float32)
        acc += tl.dot(a, w, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + j * BLOCK + offs_b).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * out_width + j * BLOCK + offs_b[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=in_rows)


@triton.jit
def _sdd_kernel(
    dy_ptr,
    x_ptr,
    out_ptr,
    rows_ptr,
    cols_ptr,
    n_rows,
    dy_width,
    x_width,
    BLOCK: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,
):
    e = tl.program_id(0)
    r = tl.load(rows_ptr + e)
    c = tl.load(cols_ptr + e)
    offs_b = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, n_rows, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        # grad_Y^T [B, BLOCK_K] and X [BLOCK_K, B] of this step's rows.
        dy_t = tl.load(
            dy_ptr + ks[None, :] * dy_width + r * BLOCK + offs_b[:, None],
            mask=ks[None, :] < n_rows,
            other=0.0,
        )
        x = tl.load(
            x_ptr + ks[:, None] * x_width + c * BLOCK + offs_b[None, :],
            mask=ks[:, None] < n_rows,
            other=0.0,
        )
        if DOT_IN_FP32:
            dy_t, x = dy_t.to(tl.float32), x.to(tl.float32)
        acc += tl.dot(dy_t, x, input_precision=PRECISION)
    out = out_ptr + e.to(tl.int64) * BLOCK * BLOCK + offs_b[:, None] * BLOCK + offs_b[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty))


def _dot_in_fp32(dtype: torch.dtype) -> bool:
    """Whether to widen the operands of tl.dot to fp32: only for bf16 in Triton's interpreter,
    whose bf16 tl.dot returns garbage (Triton 3.8), so that the tests check the rest."""
    return dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"


def _precision(kind: str) -> str:
    """tl.dot's input_precision for a dot kind of ``configs.dot_kind``."""
    return "ieee" if kind == "ieee" else "tf32"  # "tf32" is ignored for 16-bit inputs


def _check(name: str, values_or_block: Tensor | int, *dense: tuple[str, Tensor]) -> int:
    """The block size, after checking what the Triton kernels need beyond the op's schema."""
    block = values_or_block if isinstance(values_or_block, int) else values_or_block.shape[-1]
    if block not in configs.BLOCKSPARSE_BLOCKS:
        raise ValueError(
            f"fastopt.{name}: the Triton kernels take blocks of 16 to 128, got {block}"
        )
    for label, t in dense:
        if t.dtype not in configs.BLOCKSPARSE_DTYPES:
            raise TypeError(f"fastopt.{name}: {label} must be float16, bfloat16 or float32")
    return block


def _as_matrix(t: Tensor) -> Tensor:
    """t [..., features] as a contiguous [rows, features] matrix (reshape(-1, 0) is ambiguous)."""
    return t.reshape(t.shape[:-1].numel(), t.shape[-1]).contiguous()


def dsd_grid(op: str, rows: int, out_blocks: int, config: configs.Config) -> tuple[int, int]:
    """(row tiles, output block columns): the rows, unbounded, on axis 0."""
    tiles = triton.cdiv(rows, dict(config.blocks)["BLOCK_M"])
    return checked_grid(op, (tiles, out_blocks), ("row tiles", "output block columns"))


def sdd_grid(op: str, nnz: int) -> tuple[int]:
    """One program per stored block."""
    return checked_grid(op, (nnz,), ("stored blocks",))


def _dsd(op, a: Tensor, values: Tensor, offsets: Tensor, indices: Tensor, order, transpose, bias):
    block = values.shape[-1]
    a2 = _as_matrix(a)
    values = values.contiguous()
    out_blocks = offsets.numel() - 1
    out = a2.new_empty((a2.shape[0], out_blocks * block))
    if out.numel() and a2.shape[0]:
        kind = configs.dot_kind(a2.dtype)
        config = configs.dsd(block, kind, a2.shape[0])
        grid = dsd_grid(op, a2.shape[0], out_blocks, config)
        with device_guard(a2.device):
            _dsd_kernel[grid](
                a2,
                values,
                bias.contiguous() if bias is not None else values,
                out,
                offsets,
                indices,
                order if order is not None else indices,
                a2.shape[0],
                a2.shape[1],
                out.shape[1],
                1 if transpose else block,
                block if transpose else 1,
                HAS_BIAS=bias is not None,
                HAS_ORDER=order is not None,
                BLOCK=block,
                PRECISION=_precision(kind),
                DOT_IN_FP32=_dot_in_fp32(a2.dtype),
                **config.launch_options(),
            )
    return out.reshape(*a.shape[:-1], out.shape[1])


def blocksparse_linear(
    input, values, bias, crow_indices, col_indices, row_indices, ccol_indices, t_row_indices,
    t_block_indices,
) -> Tensor:  # fmt: skip
    """``input @ W.T + bias`` (the op's CUDA kernel; arguments as the op's schema)."""
    check_blocksparse_linear(
        input, values, bias, crow_indices, col_indices, row_indices, ccol_indices, t_row_indices,
        t_block_indices,
    )  # fmt: skip
    _check("blocksparse_linear", values, ("input", input))
    return _dsd("blocksparse_linear", input, values, crow_indices, col_indices, None, True, bias)


def blocksparse_linear_grad_input(
    grad_output, values, ccol_indices, t_row_indices, t_block_indices
) -> Tensor:
    """``grad_output @ W`` (the op's CUDA kernel)."""
    check_blocksparse_linear_grad_input(
        grad_output, values, ccol_indices, t_row_indices, t_block_indices
    )
    _check("blocksparse_linear_grad_input", values, ("grad_output", grad_output))
    return _dsd(
        "blocksparse_linear_grad_input", grad_output, values, ccol_indices, t_row_indices,
        t_block_indices, False, None,
    )  # fmt: skip


def blocksparse_linear_grad_values(grad_output, input, row_indices, col_indices, block_size):
    """The stored blocks of ``grad_output^T @ input`` (the op's CUDA kernel)."""
    check_blocksparse_linear_grad_values(grad_output, input, row_indices, col_indices, block_size)
    block = _check("blocksparse_linear_grad_values", block_size, ("input", input))
    x = _as_matrix(input)
    dy = _as_matrix(grad_output)
    nnz = col_indices.numel()
    out = x.new_empty((nnz, block, block))
    if nnz:
        kind = configs.dot_kind(x.dtype)
        config = configs.sdd(block, kind, x.shape[0])
        grid = sdd_grid("blocksparse_linear_grad_values", nnz)
        with device_guard(x.device):
            _sdd_kernel[grid](
                dy,
                x,
                out,
                row_indices,
                col_indices,
                x.shape[0],
                dy.shape[1],
                x.shape[1],
                BLOCK=block,
                PRECISION=_precision(kind),
                DOT_IN_FP32=_dot_in_fp32(x.dtype),
                **config.launch_options(),
            )
    return out
