"""Block layouts of a block-sparse weight: boolean masks [out / B, in / B] made at random or by
block magnitude, and conversions between a dense weight and its stored blocks."""

from __future__ import annotations

import math

import torch
from torch import Tensor

NORMS = ("l2", "l1")


def check_block_shape(out_features: int, in_features: int, block_size: int) -> tuple[int, int]:
    """The block grid (out / B, in / B); a ValueError saying what to change if B does not divide
    both dimensions."""
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size % block_size:
            raise ValueError(
                f"{name}={size} is not a multiple of block_size={block_size}; choose a block "
                f"size that divides both in_features and out_features"
            )
    return out_features // block_size, in_features // block_size


def blocks_per_row(density: float, shape: tuple[int, int], balanced: bool) -> int:
    """How many blocks a layout of `density` keeps: in all, or per block row when `balanced`."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    rows, cols = shape
    count = cols if balanced else rows * cols
    return min(count, max(1, round(density * count)))  # at least one block, where there is one


def _mask_of_top(scores: Tensor, density: float, balanced: bool) -> Tensor:
    """The mask of the highest `scores` [rows, cols]: the top fraction `density` of all blocks,
    or of each block row when `balanced`."""
    k = blocks_per_row(density, tuple(scores.shape), balanced)
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    if balanced:
        mask.scatter_(1, scores.topk(k, dim=1).indices, True)
    else:
        mask.view(-1)[scores.flatten().topk(k).indices] = True
    return mask


def random_mask(
    shape: tuple[int, int],
    density: float,
    *,
    balanced: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """A random layout with round(density * blocks) blocks (per block row when `balanced`)."""
    scores = torch.rand(shape, generator=generator)
    return _mask_of_top(scores, density, balanced).to(device)


def block_norms(weight: Tensor, block_size: int, norm: str = "l2") -> Tensor:
    """The L2 or L1 norm of every B x B block of `weight` [out, in], as [out / B, in / B]."""
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    rows, cols = check_block_shape(weight.shape[0], weight.shape[1], block_size)
    blocks = weight.detach().double().reshape(rows, block_size, cols, block_size)
    if norm == "l2":
        return blocks.square().sum((1, 3)).sqrt()
    return blocks.abs().sum((1, 3))


def magnitude_mask(
    weight: Tensor, block_size: int, density: float, *, norm: str = "l2", balanced: bool = False
) -> Tensor:
    """The layout keeping the blocks of `weight` with the largest norms."""
    return _mask_of_top(block_norms(weight, block_size, norm), density, balanced)


def blocks_from_dense(weight: Tensor, mask: Tensor) -> Tensor:
    """The blocks of `weight` [out, in] at `mask`, as [nnz, B, B] in the mask's row-major order."""
    rows, cols = mask.shape
    b = weight.shape[0] // rows
    grid = weight.reshape(rows, b, cols, b).transpose(1, 2)
    return grid[mask].contiguous()


def dense_from_blocks(values: Tensor, mask: Tensor) -> Tensor:
    """The dense weight [out, in] holding `values` [nnz, B, B] at `mask` and zeros elsewhere."""
    rows, cols = mask.shape
    b = values.shape[-1]
    grid = values.new_zeros((rows, cols, b, b))
    grid[mask] = values
    return grid.transpose(1, 2).reshape(rows * b, cols * b)


def init_bound(in_features: int) -> float:
    """nn.Linear's init bound, 1 / sqrt(in_features), used for the blocks and the bias."""
    return 1.0 / math.sqrt(in_features) if in_features else 0.0
