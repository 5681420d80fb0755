"""The CPU dsd products (forward, grad_input) with an output block of every entry count: a
triangular layout gives block rows (forward) and block columns (grad_input) of 1 to 26 entries,
at batches of the narrow tile, of one wide panel and of several; checked against a dense fp64
matmul with the masked weight on every instruction set (a way of taking the entries in groups,
which was tried on branch bsfast5, must pass it at every group edge)."""

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
