"""The CPU block-sparse kernels' cache-blocking paths against a dense fp64 matmul with the masked
weight, on every instruction set: grad_values (the sdd product) sums each block over the batch
rows in L1-sized chunks (256, 128 and 64 rows for blocks of 16, 32 and 64) and takes the blocks
in groups of block rows by block column (a group's dY panels fill about 1 MiB, so a batch of
1100 rows makes groups of 14, 7 and 3 block rows; an X of at most 1 MiB keeps the layout's
order). The cases put the batch around the chunk
sizes, the layouts across several groups with empty block rows and columns, and the blocks in
any order. The dsd products (forward, grad_input) sum each output block entry after entry in
tiles whose sums wait in a per-panel buffer; output block columns without entries (empty block
rows for the forward, empty block columns for grad_input) are zeros plus the bias."""

from __future__ import annotations

import pytest
import torch
from helpers.blocksparse_reference import assert_close_to_reference, make_case, make_mask
from helpers.blocksparse_run import run_with_autograd

import fastopt.functional.blocksparse as bs

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
DTYPE_IDS = ["fp32", "bf16", "fp64"]


def grad_values(case, block: int, rows=None, cols=None):
    """The grad_values op on the case's grad_out and input, at the mask's blocks (row-major) or
    at the blocks (rows[i], cols[i])."""
    if rows is None:
        index = bs.index_from_mask(case.mask)
        rows, cols = index.row_indices, index.col_indices
    return torch.ops.fastopt.blocksparse_linear_grad_values(
        case.grad_out, case.x, rows, cols, block
    )


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("batch", [1, 7, 63, 64, 65, 129, 257, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_batch_around_the_chunks(cpu_isa, block, batch, dtype):
    mask = make_mask("random", 3, 4, torch.Generator().manual_seed(batch + block))
    case = make_case(mask, block, (batch,), dtype, seed=batch * block)
    assert_close_to_reference({"values": grad_values(case, block)}, case)


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_layout_over_several_groups(cpu_isa, block, dtype):
    gen = torch.Generator().manual_seed(block)
    mask = torch.rand((20, 16), generator=gen) < 0.3
    mask[[2, 9, 10, 17]] = False  # empty block rows, within groups and across a group's edge
    mask[:, 4] = False  # an empty block column
    mask[0, 0] = mask[19, 15] = True
    case = make_case(mask, block, (1100,), dtype, seed=block + 3)
    assert case.x.numel() * 4 > 1 << 20  # X's panels exceed the budget of a group
    assert_close_to_reference({"values": grad_values(case, block)}, case)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_blocks_in_any_order(cpu_isa, block):
    """The op takes (row, column) pairs in any order, repeats included: each output block is the
    block of dY^T X at its own pair."""
    gen = torch.Generator().manual_seed(block + 7)
    mask = torch.ones((12, 5), dtype=torch.bool)
    case = make_case(mask, block, (700,), torch.float32, seed=block + 8)
    rows = torch.randint(0, 12, (40,), generator=gen)
    cols = torch.randint(0, 5, (40,), generator=gen)
    result = grad_values(case, block, rows, cols)
    g, x = case.grad_out.double(), case.x.double()
    for i, (r, c) in enumerate(zip(rows.tolist(), cols.tolist(), strict=True)):
        expected = g[:, r * block : (r + 1) * block].T @ x[:, c * block : (c + 1) * block]
        torch.testing.assert_close(result[i].double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_empty_batch_gives_zero_blocks(cpu_isa, dtype):
    mask = make_mask("random", 3, 4, torch.Generator().manual_seed(5))
    case = make_case(mask, 32, (0,), dtype, seed=6)
    result = grad_values(case, 32)
    assert result.shape == (int(mask.sum()), 32, 32) and result.dtype == dtype
    assert torch.equal(result, torch.zeros_like(result))


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("batch", [1, 23, 49, 97])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dsd_with_empty_block_rows_and_columns(cpu_isa, block, batch, dtype):
    gen = torch.Generator().manual_seed(block * batch)
    mask = torch.rand((5, 4), generator=gen) < 0.6
    mask[1] = False  # an empty block row: forward output columns of bias only
    mask[:, 2] = False  # an empty block column: zero grad_input columns
    mask[0, 0] = mask[4, 3] = True
    case = make_case(mask, block, (batch,), dtype, seed=block + batch)
    assert_close_to_reference(run_with_autograd(case), case)
