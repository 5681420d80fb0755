"""The block-sparse layer's functional API: the layout's index tensors, the op's autograd, and the
entry point ``blocksparse_linear``.

A weight W [out, in] with a block layout (a boolean mask [out / B, in / B]) is stored as its
nonzero blocks ``values`` [nnz, B, B], in row-major order of the mask, and a
``BlockSparseIndex``: plain integer tensors built once per layout, which the kernels read:

- forward ``Y = X W^T + b`` walks block rows (block-CSR: ``crow_indices``, ``col_indices``);
- ``grad_X = grad_Y W`` walks block columns (the transposed index: ``ccol_indices``,
  ``t_row_indices``, and ``t_block_indices``, the position in ``values`` of each entry);
- ``grad_values = grad_Y^T X`` sampled at the stored blocks (``row_indices``, ``col_indices``).

On CPU tensors the ops run fastopt's C++ kernels, on CUDA tensors its Triton kernels
(``fastopt.triton.blocksparse``, registered as `_layers` says). As the int8 layer: the kernels, the
op with its autograd registered here, the Module ``fastopt.nn.BlockSparseLinear``, the
model-wide helper ``fastopt.nn.sparsify_``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .. import _library
from . import _layers

__all__ = ["BlockSparseIndex", "blocksparse_linear", "index_from_mask"]

_OPS = ("blocksparse_linear", "blocksparse_linear_grad_input", "blocksparse_linear_grad_values")


class BlockSparseIndex(NamedTuple):
    """The index tensors (int64, on the weight's device) of one block layout, made by
    `index_from_mask`.

    >>> import torch, fastopt
    >>> index = fastopt.functional.index_from_mask(torch.tensor([[True, False], [True, True]]))
    >>> index.crow_indices, index.col_indices
    (tensor([0, 1, 3]), tensor([0, 0, 1]))
    """

    crow_indices: Tensor  # [out/B + 1]: block row r holds entries crow[r]..crow[r+1]
    col_indices: Tensor  # [nnz]: block column of each stored block
    row_indices: Tensor  # [nnz]: block row of each stored block
    ccol_indices: Tensor  # [in/B + 1]: block column c holds entries ccol[c]..ccol[c+1]
    t_row_indices: Tensor  # [nnz]: block row of each entry, in block-column order
    t_block_indices: Tensor  # [nnz]: position in `values` of each entry, in block-column order


def index_from_mask(mask: Tensor) -> BlockSparseIndex:
    """The index of a block layout given as a boolean mask [out / B, in / B], on its device.

    >>> import torch, fastopt
    >>> index = fastopt.functional.index_from_mask(torch.tensor([[True, False], [True, True]]))
    >>> index.ccol_indices, index.t_row_indices, index.t_block_indices  # by block column
    (tensor([0, 2, 3]), tensor([0, 1, 1]), tensor([0, 1, 2]))
    """
    if mask.dim() != 2:
        raise ValueError(
            f"a block layout is a 2-D mask [out/B, in/B], got shape {tuple(mask.shape)}"
        )
    mask = mask.to(torch.bool)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: the order of `values`
    zero = torch.zeros(1, dtype=torch.long, device=mask.device)
    crow = torch.cat([zero, mask.sum(1).cumsum(0)])
    ccol = torch.cat([zero, mask.sum(0).cumsum(0)])
    t_block = torch.argsort(cols * mask.shape[0] + rows)  # column-major order of the blocks
    return BlockSparseIndex(crow, cols, rows, ccol, rows[t_block], t_block)


def blocksparse_linear(
    input: Tensor, values: Tensor, index: BlockSparseIndex, bias: Tensor | None = None
) -> Tensor:
    """``input @ W.T + bias`` for the block-sparse W held by ``values`` and ``index``.

    Args:
        input: [..., in_features], of the dtype and device of ``values``.
        values: the stored blocks [nnz, B, B], in the row-major order of the layout's mask;
            block i is ``W[r*B:(r+1)*B, c*B:(c+1)*B]`` for the i-th nonzero (r, c) of the mask.
        index: ``index_from_mask(mask)``, on the device of ``values``.
        bias: optional [out_features].

    Returns [..., out_features]. Differentiable in ``input``, ``values`` and ``bias``: the
    gradient of ``values`` is that of the stored blocks only; twice differentiable
    (``create_graph=True``). CPU: float32 and bfloat16 (fp32 accumulation) and float64, block
    sizes 16, 32, 64; CUDA (Triton): float16, bfloat16, float32 (TF32 when
    ``torch.backends.cuda.matmul.allow_tf32``), block sizes 16 to 128.

    ``fastopt.nn.BlockSparseLinear`` holds these arguments; called directly:

    >>> import torch, fastopt
    >>> mask = torch.tensor([[True, False], [True, True]])  # 2 x 2 blocks of 16: W is 32 x 32
    >>> values = torch.randn(3, 16, 16, requires_grad=True)
    >>> index = fastopt.functional.index_from_mask(mask)
    >>> x = torch.randn(5, 32)
    >>> y = fastopt.functional.blocksparse_linear(x, values, index)
    >>> dense = torch.zeros(32, 32)
    >>> dense[:16, :16], dense[16:, :16], dense[16:, 16:] = values.detach()
    >>> torch.allclose(y, x @ dense.T, atol=1e-5)
    True
    >>> y.sum().backward()  # gradients of the stored blocks only
    >>> values.grad.shape
    torch.Size([3, 16, 16])
    """
    _layers.require_kernels(input.device, "blocksparse_linear", "blocksparse")
    # The kernels read the index tensors as plain arrays: they must be contiguous.
    index = [t.contiguous() for t in index]
    return _layers.call_checked(
        torch.ops.fastopt.blocksparse_linear,
        lambda: _check(input, values, bias, index),
        input,
        values,
        bias,
        *index,
    )


def _check(input: Tensor, values: Tensor, bias: Tensor | None, index: list[Tensor]) -> None:
    """The checks of fastopt::blocksparse_linear's fake, for the CPU path."""
    block, _ = _library.check_blocksparse_linear(input, values, bias, *index)
    _library.check_blocksparse_kernels("fastopt.blocksparse_linear", "values", values, block)


def _setup_context(ctx, inputs, output) -> None:
    input, values, bias, *index = inputs
    ctx.save_for_backward(input, values, *index)


def _grad_input(grad_output: Tensor, values: Tensor, index: BlockSparseIndex) -> Tensor:
    """``grad_output @ W``, differentiable when grad mode is on (double backward)."""
    if torch.is_grad_enabled() and (grad_output.requires_grad or values.requires_grad):
        return _GradInput.apply(grad_output, values, *index)
    return torch.ops.fastopt.blocksparse_linear_grad_input(
        grad_output, values, index.ccol_indices, index.t_row_indices, index.t_block_indices
    )


def _grad_values(grad_output: Tensor, input: Tensor, index: BlockSparseIndex, block: int) -> Tensor:
    """The stored blocks of ``grad_output^T @ input``, differentiable when grad mode is on."""
    if torch.is_grad_enabled() and (grad_output.requires_grad or input.requires_grad):
        return _GradValues.apply(grad_output, input, block, *index)
    return torch.ops.fastopt.blocksparse_linear_grad_values(
        grad_output, input, index.row_indices, index.col_indices, block
    )


class _GradInput(torch.autograd.Function):
    """GI = G W. Its derivatives: wrt G, U W^T (the forward op); wrt the blocks of W, the stored
    blocks of G^T U (grad_values)."""

    @staticmethod
    def forward(ctx, grad_output, values, *index):
        ctx.save_for_backward(grad_output, values, *index)
        index = BlockSparseIndex(*index)
        return torch.ops.fastopt.blocksparse_linear_grad_input(
            grad_output, values, index.ccol_indices, index.t_row_indices, index.t_block_indices
        )

    @staticmethod
    def backward(ctx, upstream):
        grad_output, values, *index = ctx.saved_tensors
        index = BlockSparseIndex(*index)
        d_grad_output = d_values = None
        if ctx.needs_input_grad[0]:
            d_grad_output = torch.ops.fastopt.blocksparse_linear(upstream, values, None, *index)
        if ctx.needs_input_grad[1]:
            d_values = _grad_values(grad_output, upstream, index, values.shape[1])
        return d_grad_output, d_values, *(None,) * len(index)


class _GradValues(torch.autograd.Function):
    """GV = the stored blocks of G^T X. Its derivatives for upstream blocks V (a block-sparse
    matrix of the same layout): wrt G, X V^T (the forward op); wrt X, G V (grad_input)."""

    @staticmethod
    def forward(ctx, grad_output, input, block, *index):
        ctx.save_for_backward(grad_output, input, *index)
        index = BlockSparseIndex(*index)
        return torch.ops.fastopt.blocksparse_linear_grad_values(
            grad_output, input, index.row_indices, index.col_indices, block
        )

    @staticmethod
    def backward(ctx, upstream):
        grad_output, input, *index = ctx.saved_tensors
        index = BlockSparseIndex(*index)
        d_grad_output = d_input = None
        if ctx.needs_input_grad[0]:
            d_grad_output = torch.ops.fastopt.blocksparse_linear(input, upstream, None, *index)
        if ctx.needs_input_grad[1]:
            d_input = _grad_input(grad_output, upstream, index)
        return d_grad_output, d_input, None, *(None,) * len(index)


def _backward(ctx, grad_output):
    input, values, *index = ctx.saved_tensors
    index = BlockSparseIndex(*index)
    grad_input = grad_values = grad_bias = None
    # With create_graph=True (grad mode on here) these are differentiable in turn.
    if ctx.needs_input_grad[0]:
        grad_input = _grad_input(grad_output, values, index)
    if ctx.needs_input_grad[1]:
        grad_values = _grad_values(grad_output, input, index, values.shape[1])
    if ctx.needs_input_grad[2]:
        grad_bias = _layers.bias_grad(grad_output)
    return grad_input, grad_values, grad_bias, None, None, None, None, None, None


torch.library.register_autograd(
    "fastopt::blocksparse_linear", _backward, setup_context=_setup_context
)


_layers.register_triton_kernels("blocksparse", _OPS)
