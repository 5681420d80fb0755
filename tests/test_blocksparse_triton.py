"""The Triton kernels of the block-sparse ops, called through their launchers on CPU tensors in
Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU; on a GPU machine the
same launchers run on CUDA tensors). Shapes are tiny: the interpreter is slow."""

from __future__ import annotations

import os

import pytest
import torch
from blocksparse_reference import assert_close_to_reference, make_case, make_mask

import fastopt.blocksparse as bs

triton_blocksparse = pytest.importorskip("fastopt.triton.blocksparse")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)


def launch_all(case, device=DEVICE) -> dict[str, torch.Tensor]:
    """Forward, grad_input and grad_values through the three launchers; results on the CPU."""
    x, values, grad_out = (t.to(device) for t in (case.x, case.values, case.grad_out))
    bias = case.bias.to(device) if case.bias is not None else None
    index = bs.index_from_mask(case.mask.to(device))
    block = values.shape[-1]
    results = {
        "out": triton_blocksparse.blocksparse_linear(x, values, bias, *index),
        "input": triton_blocksparse.blocksparse_linear_grad_input(
            grad_out, values, index.ccol_indices, index.t_row_indices, index.t_block_indices
        ),
        "values": triton_blocksparse.blocksparse_linear_grad_values(
            grad_out, x, index.row_indices, index.col_indices, block
        ),
    }
    return {k: v.cpu() for k, v in results.items()}


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 without TF32, so that it can be held to the fp32 tolerance."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize(
    "kind, dtype, batch",
    [
        ("random", torch.float32, (5,)),  # one tile of rows, masked
        ("empty_rows", torch.float32, (2, 20)),  # more rows than a tile; an empty output block
        ("full_rows", torch.float16, (3,)),
        ("single", torch.bfloat16, (4,)),
    ],
    ids=["random-fp32", "empty_rows-fp32", "full_rows-fp16", "single-bf16"],
)
def test_triton_kernels_match_reference(kind, dtype, batch):
    mask = make_mask(kind, 2, 3, torch.Generator().manual_seed(0))
    case = make_case(mask, 16, batch, dtype, seed=len(batch))
    assert_close_to_reference(launch_all(case), case)


def test_triton_kernels_without_bias_block_32():
    mask = make_mask("random", 2, 2, torch.Generator().manual_seed(1))
    case = make_case(mask, 32, (3,), torch.float32, seed=2, bias=False)
    results = launch_all(case)
    assert_close_to_reference(results, case)


def test_triton_rejects_a_block_size_it_cannot_tile():
    values = torch.randn(1, 8, 8)
    index = bs.index_from_mask(torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="blocks of 16 to 128, got 8"):
        triton_blocksparse.blocksparse_linear(torch.randn(2, 8), values, None, *index)


@pytest.mark.parametrize("name", bs._OPS)
def test_every_op_has_a_cuda_kernel(name):
    """Each op has a CUDA kernel (fastopt builds no C++ one for them: it is the Triton one)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastopt::{name}", "CUDA")


def test_registered_cuda_kernel_runs_the_launcher():
    """The function registered for CUDA, called on CPU tensors here, imports the launchers and
    gives their result."""
    mask = make_mask("random", 2, 2, torch.Generator().manual_seed(3))
    case = make_case(mask, 16, (3,), torch.float32, seed=4)
    index = bs.index_from_mask(mask)
    out = bs._triton_kernel("blocksparse_linear")(case.x, case.values, case.bias, *index)
    assert_close_to_reference({"out": out}, case)
