"""The block-sparse dsd products' division of work on the CPU: units of (panel of batch rows, chunk
of output block columns), runs of them per thread, each thread packing the panels it uses (a panel
cut between two threads is packed by both). Forward and backward against a dense fp64 matmul with
the masked weight, for thread counts that cut panels and column chunks in different places, more
threads than output block columns, batches that leave a partial last panel, in and out features
that are odd multiples of the block, every dtype the CPU kernels take and every instruction set."""

from __future__ import annotations

import pytest
import torch
from helpers.blocksparse_reference import assert_close_to_reference, make_case, make_mask
from helpers.blocksparse_run import run_with_autograd


@pytest.fixture(params=[1, 2, 3, 5])
def threads(request):
    """Runs the test with torch's intra-op pool (which fastopt's kernels share) at this size."""
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(previous)


# Batches: one row, within one vector, one panel of 48 rows plus one, several panels with a
# partial last one (24-row panels without AVX-512), and a batch of several dims.
BATCHES = [(1,), (13,), (49,), (163,), (3, 37)]


@pytest.mark.parametrize("batch", BATCHES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_units_over_threads(cpu_isa, threads, batch, dtype):
    # 5 x 3 blocks of 32: out and in features are odd multiples of the block.
    mask = make_mask("random", 5, 3, torch.Generator().manual_seed(len(batch) + threads))
    case = make_case(mask, 32, batch, dtype, seed=threads * 10 + batch[-1])
    assert_close_to_reference(run_with_autograd(case), case)


@pytest.mark.parametrize("block", [16, 64])
def test_fewer_block_columns_than_threads(threads, block):
    """One output block column (forward) and one input block column (grad_input): the column
    chunks cannot outnumber the columns, and the panels alone share the work."""
    for rows, cols in ((1, 3), (3, 1)):
        mask = torch.ones(rows, cols, dtype=torch.bool)
        case = make_case(mask, block, (101,), torch.float32, seed=block + rows)
        assert_close_to_reference(run_with_autograd(case), case)


def test_uneven_columns_and_empty_columns(threads):
    """Block columns of very different entry counts (one full row, empty rows and columns): the
    chunks are cut by cost, and a chunk may hold only empty columns."""
    for kind in ("full_rows", "empty_rows", "empty"):
        mask = make_mask(kind, 7, 9, torch.Generator().manual_seed(3))
        case = make_case(mask, 16, (77,), torch.float32, seed=4)
        assert_close_to_reference(run_with_autograd(case), case)


def test_float64_on_the_same_shapes(threads):
    """float64 takes ATen's products over the stored blocks: checked on the same kind of shapes."""
    mask = make_mask("random", 5, 3, torch.Generator().manual_seed(5))
    case = make_case(mask, 32, (49,), torch.float64, seed=6)
    assert_close_to_reference(run_with_autograd(case), case)


def test_weights_changed_in_place_are_seen_by_the_next_call(threads):
    """The kernels read the blocks on every call (nothing is cached between calls): an optimizer
    step that changes them in place shows in the next forward and backward."""
    from fastopt.nn import BlockSparseLinear

    torch.manual_seed(7)
    layer = BlockSparseLinear(96, 160, block_size=32, density=0.5)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(53, 96)
    for _ in range(3):
        out = layer(x)
        out.square().mean().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            after = layer(x)
            assert not torch.equal(after, out.detach())  # the step did change the blocks
            expected = x.double() @ layer.dense_weight().double().T + layer.bias.double()
            scale = expected.abs().max().item()
            torch.testing.assert_close(after.double(), expected, rtol=1e-5, atol=1e-5 * scale)
