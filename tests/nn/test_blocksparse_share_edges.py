"""The CPU block-sparse kernels at the edges of their work: each thread's share of the blocks
(grad_values) or of the (batch panel, output block columns) units (forward, grad_input) ends
where the thread count puts it, and the kernels prefetch the chunk or entry that follows, in the
same block or the next one of the share; the dsd products move every element of the dense
operand and of the output through in-register transposes of a vector's width. Results are
compared with a dense fp64 matmul of the masked weight, are the same bits at every thread count
(each output element is summed in one order whichever thread takes it), and an identity weight
must give back its input exactly at every instruction set, whatever the batch's remainder
modulo the vector width."""

from __future__ import annotations

import pytest
import torch
from helpers.blocksparse_reference import assert_close_to_reference, make_case
from helpers.blocksparse_run import run_with_autograd

import fastopt.functional.blocksparse as bs

DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]


def run_with_threads(case, threads: int) -> dict[str, torch.Tensor]:
    """run_with_autograd with `threads` threads, on copies of the case's leaves (on the CPU it
    makes them the leaves themselves, whose gradients would add up over the runs)."""
    previous = torch.get_num_threads()
    fresh = case._replace(x=case.x.clone(), values=case.values.clone(), bias=case.bias.clone())
    try:
        torch.set_num_threads(threads)
        return run_with_autograd(fresh)
    finally:
        torch.set_num_threads(previous)


# Batches of whole chunks of grad_values (256, 128, 64 rows for blocks of 16, 32, 64) and of
# whole and partial last chunks; 1100 rows with 40 column blocks of 32 put X's panels over the
# budget of a group, so the blocks are taken by groups of block rows.
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("batch", [256, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_every_thread_count(block, batch, dtype):
    gen = torch.Generator().manual_seed(batch + block)
    mask = torch.rand((9, 7), generator=gen) < 0.35
    mask[3] = False  # an empty block row (forward) ...
    mask[:, 5] = False  # ... and block column (grad_input)
    mask[0, 0] = True
    case = make_case(mask, block, (batch,), dtype, seed=batch * block + 1)
    results = [run_with_threads(case, n) for n in (1, 2, 3, 5)]
    assert_close_to_reference(results[0], case)
    for other in results[1:]:
        for name, value in other.items():
            assert torch.equal(value, results[0][name]), name


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_grouped_blocks_at_every_thread_count(dtype):
    gen = torch.Generator().manual_seed(11)
    mask = torch.rand((24, 40), generator=gen) < 0.15
    case = make_case(mask, 32, (1100,), dtype, seed=12, bias=False)
    assert case.x.numel() * 4 > 1 << 20  # X's panels exceed the budget of a group
    index = bs.index_from_mask(mask)
    results = []
    previous = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(
                torch.ops.fastopt.blocksparse_linear_grad_values(
                    case.grad_out, case.x, index.row_indices, index.col_indices, 32
                )
            )
    finally:
        torch.set_num_threads(previous)
    assert_close_to_reference({"values": results[0]}, case)
    assert all(torch.equal(r, results[0]) for r in results[1:])


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("batch", [1, 7, 17, 50])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_identity_weight_gives_back_its_input(cpu_isa, block, batch, dtype):
    """With identity blocks on the diagonal, Y = X + b and grad_input = grad_output exactly (every
    other product is a zero): a misplaced element of a transpose cannot hide in a tolerance."""
    blocks = 5
    mask = torch.eye(blocks, dtype=torch.bool)
    case = make_case(mask, block, (batch,), dtype, seed=batch + block)
    values = torch.eye(block, dtype=dtype).expand(blocks, block, block).contiguous()
    x = case.x.requires_grad_()
    out = bs.blocksparse_linear(x, values, bs.index_from_mask(mask), case.bias)
    out.backward(case.grad_out)
    assert torch.equal(out, (case.x.float() + case.bias.float()).to(dtype))
    assert torch.equal(x.grad, case.grad_out)
