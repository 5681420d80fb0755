"""The block-sparse linear ops on the CPU (every compiled instruction set) and on CUDA (where a
GPU is present) against a dense fp64 matmul with the masked weight: output, grad of the input,
of the stored blocks and of the bias, for every kind of layout, block size, batch shape, dtype."""

from __future__ import annotations

import pytest
import torch
from helpers.blocksparse_reference import (
    LAYOUT_KINDS,
    assert_close_to_reference,
    make_case,
    make_mask,
)
from helpers.blocksparse_run import run_with_autograd

import fastopt.functional.blocksparse as bs


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layouts_and_block_sizes(cpu_isa, kind, block, dtype):
    gen = torch.Generator().manual_seed(block)
    mask = make_mask(kind, 3, 4, gen) if kind != "single" else make_mask(kind, 1, 1, gen)
    case = make_case(mask, block, (2, 29), dtype, seed=block + len(kind))
    assert_close_to_reference(run_with_autograd(case), case)


# (): one sample without a batch dim; 0: an empty batch; 25 and 50: more than one panel of 24
# rows, with a tail; (2, 3, 5): several batch dims.
@pytest.mark.parametrize("batch", [(), (0,), (1,), (7,), (25,), (50,), (2, 3, 5)], ids=str)
def test_batch_shapes(cpu_isa, batch):
    mask = make_mask("random", 2, 3, torch.Generator().manual_seed(1))
    case = make_case(mask, 16, batch, torch.float32, seed=len(batch))
    assert_close_to_reference(run_with_autograd(case), case)


def test_without_bias():
    mask = make_mask("random", 2, 5, torch.Generator().manual_seed(2))
    case = make_case(mask, 32, (9,), torch.float32, seed=3, bias=False)
    assert_close_to_reference(run_with_autograd(case), case)


def test_non_contiguous_input_and_grad():
    mask = make_mask("random", 2, 3, torch.Generator().manual_seed(4))
    case = make_case(mask, 16, (11,), torch.float32, seed=5)
    # A transposed view with the same values, and a grad with a stride of 2.
    x = case.x.T.contiguous().T
    grad_out = torch.stack([case.grad_out, case.grad_out], -1)[..., 0]
    assert not x.is_contiguous() and not grad_out.is_contiguous()
    strided = case._replace(x=x, grad_out=grad_out)
    assert_close_to_reference(run_with_autograd(strided), case)


def test_grad_input_and_values_ops_alone():
    """The two gradient ops called directly, as the autograd formula calls them."""
    mask = make_mask("empty_rows", 4, 3, torch.Generator().manual_seed(6))
    case = make_case(mask, 16, (13,), torch.float32, seed=7)
    index = bs.index_from_mask(mask)
    grad_input = torch.ops.fastopt.blocksparse_linear_grad_input(
        case.grad_out, case.values, index.ccol_indices, index.t_row_indices, index.t_block_indices
    )
    grad_values = torch.ops.fastopt.blocksparse_linear_grad_values(
        case.grad_out, case.x, index.row_indices, index.col_indices, 16
    )
    forward = run_with_autograd(case)
    assert_close_to_reference(
        {"out": forward["out"], "input": grad_input, "values": grad_values}, case
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(x=torch.randn(3, 40)), "input must end in 48 features"),
        (dict(x=torch.randn(3, 48, dtype=torch.float64)), "dtype"),
        (dict(values=torch.randn(2, 16, 16)), "values must be"),
        (dict(bias=torch.randn(31)), r"bias must end in 32 features, got shape \(31,\)"),
    ],
    ids=["features", "dtype", "values", "bias"],
)
def test_bad_input_names_the_argument(bad, message):
    mask = torch.tensor([[True, False, True], [False, True, False]])
    case = make_case(mask, 16, (3,), torch.float32, seed=8)._replace(**bad)
    before = [t.clone() for t in (case.x, case.values, case.bias)]
    with pytest.raises(RuntimeError, match=message):
        bs.blocksparse_linear(case.x, case.values, bs.index_from_mask(mask), case.bias)
    for t, b in zip((case.x, case.values, case.bias), before, strict=True):
        assert torch.equal(t, b)


def test_cpu_rejects_an_index_out_of_range():
    mask = torch.tensor([[True, True]])
    case = make_case(mask, 16, (3,), torch.float32, seed=9)
    index = bs.index_from_mask(mask)
    bad = index._replace(col_indices=torch.tensor([0, 2]))
    with pytest.raises(RuntimeError, match=r"col_indices must lie in \[0, 2\)"):
        bs.blocksparse_linear(case.x, case.values, bad, case.bias)


def _strided(t: torch.Tensor) -> torch.Tensor:
    """t as a non-contiguous view (a stride of 2) with the same values."""
    return torch.stack([t, torch.zeros_like(t)], 1)[:, 0]


def test_non_contiguous_index_gives_the_right_result():
    """The functional passes contiguous index tensors to the kernels."""
    mask = make_mask("random", 3, 4, torch.Generator().manual_seed(21))
    case = make_case(mask, 16, (7,), torch.float32, seed=22)
    strided = bs.BlockSparseIndex(*(_strided(t) for t in bs.index_from_mask(mask)))
    assert not any(t.is_contiguous() for t in strided if t.numel() > 1)
    leaves = [t.clone().requires_grad_() for t in (case.x, case.values, case.bias)]
    out = bs.blocksparse_linear(leaves[0], leaves[1], strided, leaves[2])
    out.backward(case.grad_out)
    results = {"out": out.detach()} | {
        k: t.grad for k, t in zip(("input", "values", "bias"), leaves, strict=True)
    }
    assert_close_to_reference(results, case)


@pytest.mark.parametrize("field", bs.BlockSparseIndex._fields)
def test_op_rejects_a_non_contiguous_index(field):
    """The ops themselves read the index as plain arrays: a strided one is a clear error."""
    mask = torch.tensor([[True, False, True], [True, True, False]])
    case = make_case(mask, 16, (3,), torch.float32, seed=23)
    index = bs.index_from_mask(mask)
    bad = index._replace(**{field: _strided(getattr(index, field))})
    before = [t.clone() for t in (case.x, case.values, case.bias, *index)]
    with pytest.raises(RuntimeError, match=rf"{field} must be contiguous.*{field}\.contiguous\(\)"):
        if field in ("crow_indices", "col_indices"):
            torch.ops.fastopt.blocksparse_linear(case.x, case.values, case.bias, *bad)
        elif field in ("ccol_indices", "t_row_indices", "t_block_indices"):
            torch.ops.fastopt.blocksparse_linear_grad_input(
                case.grad_out, case.values, bad.ccol_indices, bad.t_row_indices,
                bad.t_block_indices,
            )  # fmt: skip
        else:
            torch.ops.fastopt.blocksparse_linear_grad_values(
                case.grad_out, case.x, bad.row_indices, bad.col_indices, 16
            )
    for t, b in zip((case.x, case.values, case.bias, *index), before, strict=True):
        assert torch.equal(t, b)
