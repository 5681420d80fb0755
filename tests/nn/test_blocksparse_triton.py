"""The Triton kernels of the block-sparse ops, called through their launchers on CPU tensors in
Triton's interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU; on a GPU machine the
same launchers run on CUDA tensors). Shapes are tiny: the interpreter is slow."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.blocksparse_reference import assert_close_to_reference, make_case, make_mask

import fastopt.functional.blocksparse as bs
from fastopt.functional import _layers

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


def _bad_launch(bad: str):
    """One launcher call, on a 64 -> 32 layer (block 16), with one bad argument."""
    torch.manual_seed(31)
    mask = torch.tensor([[True, False, True, True], [False, True, False, True]])
    values = torch.randn(int(mask.sum()), 16, 16, device=DEVICE)
    index = bs.index_from_mask(mask.to(DEVICE))
    x = torch.randn(4, 64, device=DEVICE)
    grad_out = torch.randn(4, 32, device=DEVICE)
    bias = torch.randn(32, device=DEVICE)
    if bad == "input-features":
        x = torch.randn(4, 48, device=DEVICE)
    elif bad == "input-dtype":
        x = x.double()
    elif bad == "short-bias":
        bias = torch.randn(16, device=DEVICE)
    elif bad == "bias-dtype":
        bias = bias.half()
    elif bad == "values-shape":
        values = torch.randn(values.shape[0] + 1, 16, 16, device=DEVICE)
    elif bad == "index-strided":
        strided = torch.stack([index.col_indices, torch.zeros_like(index.col_indices)], 1)[:, 0]
        index = index._replace(col_indices=strided)
    elif bad == "index-dtype":
        index = index._replace(crow_indices=index.crow_indices.int())
    elif bad == "grad-output-features":
        grad_out = torch.randn(4, 40, device=DEVICE)
    elif bad == "grad-output-dtype":
        grad_out = grad_out.half()
    elif bad == "grad-batch":
        grad_out = torch.randn(5, 32, device=DEVICE)
    inputs = (x, values, bias, grad_out, *index)
    before = [t.clone() for t in inputs]
    if bad.startswith("grad-output"):
        call = lambda: triton_blocksparse.blocksparse_linear_grad_input(  # noqa: E731
            grad_out, values, index.ccol_indices, index.t_row_indices, index.t_block_indices
        )
    elif bad == "grad-batch":
        call = lambda: triton_blocksparse.blocksparse_linear_grad_values(  # noqa: E731
            grad_out, x, index.row_indices, index.col_indices, 16
        )
    else:
        call = lambda: triton_blocksparse.blocksparse_linear(x, values, bias, *index)  # noqa: E731
    return call, inputs, before


@pytest.mark.parametrize(
    "bad, message",
    [
        ("input-features", r"input must end in 64 features, got shape \(4, 48\)"),
        ("input-dtype", r"input is torch.float64 on .*, the weight torch.float32"),
        ("short-bias", r"bias must end in 32 features, got shape \(16,\)"),
        ("bias-dtype", r"bias is torch.float16"),
        ("values-shape", r"values must be \[5, B, B\]"),
        ("index-strided", r"col_indices must be contiguous .*col_indices.contiguous\(\)"),
        ("index-dtype", r"crow_indices must be a 1-D int64 tensor"),
        ("grad-output-features", r"grad_output must end in a multiple of 16 features"),
        ("grad-output-dtype", r"grad_output is torch.float16"),
        ("grad-batch", r"input and grad_output must have the same batch shape"),
    ],
)
def test_triton_launchers_check_shapes_dtypes_and_index(bad, message):
    """Every launcher runs the op's checks before launching (a bad shape would read out of
    bounds on a GPU), and changes nothing."""
    call, inputs, before = _bad_launch(bad)
    with pytest.raises(RuntimeError, match=message):
        call()
    for t, b in zip(inputs, before, strict=True):
        assert torch.equal(t, b)


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
    out = _layers.triton_kernel("blocksparse", "blocksparse_linear")(
        case.x, case.values, case.bias, *index
    )
    assert_close_to_reference({"out": out}, case)
