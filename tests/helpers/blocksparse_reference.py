"""Shared pieces of the block-sparse tests: layouts of every shape that takes its own path through
the kernels, and the fp64 dense reference they are judged against (written independently of
fastopt's own block conversions)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Layout kinds on a grid of 3 block rows x 4 block columns (and a 1 x 1 grid for "single").
LAYOUT_KINDS = ["random", "empty_rows", "full_rows", "single", "empty", "full"]


def make_mask(kind: str, rows: int, cols: int, gen: torch.Generator) -> Tensor:
    """A block layout [rows, cols] of the given kind."""
    if kind == "random":
        mask = torch.rand((rows, cols), generator=gen) < 0.5
        mask[0, 0] = True  # never empty
        return mask
    mask = torch.zeros((rows, cols), dtype=torch.bool)
    if kind == "empty_rows":  # the middle block row and the first block column are empty
        mask[:, 1:] = torch.rand((rows, cols - 1), generator=gen) < 0.7
        mask[rows // 2] = False
    elif kind == "full_rows":  # the first block row full, the others with one block each
        mask[0] = True
        mask[1:, -1] = True
    elif kind == "single":
        mask[rows - 1, cols - 1] = True
    elif kind == "full":
        mask[:] = True
    elif kind != "empty":
        raise ValueError(kind)
    return mask


class Case(NamedTuple):
    """Inputs of one block-sparse linear call, in their dtype, and the mask."""

    x: Tensor
    values: Tensor
    bias: Tensor | None
    grad_out: Tensor
    mask: Tensor


def make_case(
    mask: Tensor,
    block: int,
    batch: tuple[int, ...],
    dtype: torch.dtype,
    seed: int,
    bias: bool = True,
) -> Case:
    gen = torch.Generator().manual_seed(seed)
    rows, cols = mask.shape
    nnz = int(mask.sum())

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    return Case(
        x=randn(*batch, cols * block),
        values=randn(nnz, block, block, scale=block**-0.5),
        bias=randn(rows * block) if bias else None,
        grad_out=randn(*batch, rows * block),
        mask=mask,
    )


def dense_weight(values: Tensor, mask: Tensor) -> Tensor:
    """W [out, in] with values[i] at the i-th nonzero of mask (row-major), by plain indexing."""
    block = values.shape[-1]
    rows, cols = mask.shape
    weight = values.new_zeros((rows * block, cols * block))
    for i, (r, c) in enumerate(mask.nonzero().tolist()):
        weight[r * block : (r + 1) * block, c * block : (c + 1) * block] = values[i]
    return weight


def stored_blocks(dense: Tensor, mask: Tensor, block: int) -> Tensor:
    """The blocks of `dense` at the nonzeros of mask (row-major), [nnz, B, B]."""
    blocks = [
        dense[r * block : (r + 1) * block, c * block : (c + 1) * block]
        for r, c in mask.nonzero().tolist()
    ]
    return torch.stack(blocks) if blocks else dense.new_zeros((0, block, block))


def reference(case: Case, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Output and gradients (input, values, bias) of the case computed densely in `dtype`."""
    x, values, bias, grad_out, mask = case
    block = values.shape[-1]
    w = dense_weight(values.to(dtype), mask)
    x2 = x.to(dtype).reshape(-1, x.shape[-1])
    g2 = grad_out.to(dtype).reshape(-1, grad_out.shape[-1])
    out = x2 @ w.T + (bias.to(dtype) if bias is not None else 0)
    result = {
        "out": out.reshape(grad_out.shape),
        "input": (g2 @ w).reshape(x.shape),
        "values": stored_blocks(g2.T @ x2, mask, block),
    }
    if bias is not None:
        result["bias"] = g2.sum(0)
    return result


def max_error(value: Tensor, ref: Tensor) -> float:
    return (value.double() - ref.double()).abs().max().item() if ref.numel() else 0.0


def assert_close_to_reference(results: dict[str, Tensor], case: Case) -> None:
    """fp32 results within 1e-5 (relative to the magnitudes involved) of the fp64 reference;
    bf16 / fp16 results at most 2x as far from it as a plain torch run in that dtype, plus one
    ulp of the magnitude."""
    exact = reference(case)
    dtype = case.x.dtype
    for name, value in results.items():
        ref = exact[name]
        assert value.dtype == dtype and value.shape == ref.shape, name
        if dtype in (torch.float32, torch.float64):
            scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
            torch.testing.assert_close(
                value.double(), ref, rtol=1e-5, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}"
            )
        else:
            low = reference(case, dtype)[name]
            torch_error = max_error(low, ref)
            error = max_error(value, ref)
            ulp = torch.finfo(dtype).eps * (ref.abs().max().item() if ref.numel() else 0.0)
            assert error <= 2 * torch_error + ulp, (
                f"{name}: error {error:.3g}, torch {dtype} error {torch_error:.3g}"
            )
