"""The CPU dsd products (forward, grad_input) sum an output block column's entries a group at a
time, each tile's sums held in registers across the group (a group's panel rows fill a fixed
share of L1: from one entry to dozens, by block size, tile width and instruction set). A triangular
layout gives block rows (forward) and block columns (grad_input) of every entry count from 1
to 26, across the groups' edges, at batches of the narrow tile, of one wide panel and of
several; checked against a dense fp64 matmul with the masked weight on every instruction set."""

from __future__ import annotations

import pytest
import torch
from helpers.blocksparse_reference import assert_close_to_reference, make_case
from helpers.blocksparse_run import run_with_autograd

DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
BLOCKS = 26  # block rows and columns of the layout


def triangular_mask() -> torch.Tensor:
    """Block row r holds r + 1 entries, block column c holds BLOCKS - c."""
    return torch.ones((BLOCKS, BLOCKS), dtype=torch.bool).tril()


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("batch", [5, 50, 101])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_entry_count_per_output_block(cpu_isa, block, batch, dtype):
    case = make_case(triangular_mask(), block, (batch,), dtype, seed=block * 1000 + batch)
    assert_close_to_reference(run_with_autograd(case), case)
