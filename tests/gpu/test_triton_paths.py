"""The Triton kernels on shapes that reach their GPU paths, run on CPU tensors in Triton's
interpreter (conftest sets TRITON_INTERPRET=1 where there is no GPU; on a GPU machine the same tests
run on CUDA tensors): more than one row tile and more than one step of every K loop in every kernel
(the row quantization's too: more than 1024 features), block sizes 64 and 128, fp32 with TF32 on
and off, the 128 x 128 int8 tiles, and the block-sparse ops through the very functions registered
for CUDA. A kernel that loses its row-tile or its K-loop offset fails here."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.blocksparse_reference import (
    assert_close_to_reference,
    dense_weight,
    make_case,
    make_mask,
    reference,
)
from helpers.blocksparse_run import run_with_autograd
from helpers.cuda import allow_tf32
from helpers.int8_reference import fake_quant_linear
from helpers.rng import generator
from torch.utils._python_dispatch import TorchDispatchMode

import fastopt.functional.blocksparse as bs
from fastopt.functional import int8
from fastopt.triton import blocksparse as triton_blocksparse
from fastopt.triton import configs
from fastopt.triton import int8_linear as triton_int8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="without a GPU the Triton kernels need TRITON_INTERPRET=1 (set by conftest.py)",
)


class RegisteredCudaKernels(TorchDispatchMode):
    """Runs each fastopt op on the kernel registered for its CUDA dispatch key, whatever the
    tensors' device: on CPU tensors, the registration's own code and the Triton launchers run in
    the interpreter, as on a GPU."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace != "fastopt":
            return func(*args, **kwargs)
        self.ops.append(func.__name__)
        return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("kind", ["random", "empty_rows"])
@pytest.mark.parametrize("batch", [(5,), (3, 70)], ids=str)
def test_registered_cuda_kernels_match_reference(dtype, block, kind, batch):
    """The ops' forward and backward through the kernels registered for CUDA (fp32 without TF32
    here, to be held to fp32's tolerance): the cases of test_blocksparse_kernels'
    test_cuda_matches_reference, which need a GPU to reach them through CUDA tensors."""
    mask = make_mask(kind, 3, 4, torch.Generator().manual_seed(block))
    case = make_case(mask, block, batch, dtype, seed=block)
    mode = RegisteredCudaKernels()
    with allow_tf32(False), mode:
        results = run_with_autograd(case, DEVICE)
    assert set(mode.ops) == {f"{name}.default" for name in bs._OPS}
    assert_close_to_reference(results, case)


def _tf32_bound(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on |a @ b - exact| when tl.dot rounds its fp32 operands to TF32 (10
    mantissa bits: a relative error of 2**-11 each, so 2**-10 per product) and sums its K
    products in fp32 (2**-24 each), plus the rounding of the bias's add."""
    magnitude = a.double().abs() @ b.double().abs()
    return (2**-10 + a.shape[1] * 2**-24) * magnitude + 1e-6


@pytest.mark.parametrize("block", [64, 128])
@pytest.mark.parametrize(
    "dtype, tf32",
    [(torch.float32, False), (torch.float32, True), (torch.bfloat16, True), (torch.float16, True)],
    ids=["fp32-ieee", "fp32-tf32", "bf16", "fp16"],
)
def test_blocksparse_kernels_reach_every_tile_and_step(block, dtype, tf32):
    """70 rows: two row tiles of the forward and grad_input kernels and two row steps of
    grad_values; a layout whose every block row and column holds two or more blocks, at nonzero
    block offsets: two or more steps of each kernel's loop over the index."""
    mask = torch.tensor([[True, True, False], [False, True, True]])
    case = make_case(mask, block, (70,), dtype, seed=block + int(tf32))
    index = bs.index_from_mask(mask.to(DEVICE))
    x, values, grad_out = (t.to(DEVICE) for t in (case.x, case.values, case.grad_out))
    with allow_tf32(tf32):
        kind = configs.dot_kind(dtype)
        tile = dict(configs.dsd(block, kind, 70).blocks)["BLOCK_M"]
        step = dict(configs.sdd(block, kind, 70).blocks)["BLOCK_K"]
        assert 70 > tile and 70 > step  # the shape reaches a second tile and a second step
        results = {
            "out": triton_blocksparse.blocksparse_linear(x, values, case.bias.to(DEVICE), *index),
            "input": triton_blocksparse.blocksparse_linear_grad_input(
                grad_out, values, index.ccol_indices, index.t_row_indices, index.t_block_indices
            ),
            "values": triton_blocksparse.blocksparse_linear_grad_values(
                grad_out, x, index.row_indices, index.col_indices, block
            ),
        }
    results = {k: v.cpu() for k, v in results.items()}
    if not (dtype == torch.float32 and tf32):
        assert_close_to_reference(results, case)
        return
    exact = reference(case)
    w = dense_weight(case.values, mask)
    x2, g2 = case.x, case.grad_out
    bounds = {
        "out": _tf32_bound(x2, w.T),
        "input": _tf32_bound(g2, w),
        "values": _tf32_bound(g2.T, x2),
    }
    for name, value in results.items():
        bound = bounds[name]
        if name == "values":
            bound = torch.stack(
                [
                    bound[r * block : (r + 1) * block, c * block : (c + 1) * block]
                    for r, c in mask.nonzero().tolist()
                ]
            )
        error = (value.double() - exact[name]).abs()
        assert value.dtype == torch.float32 and bool((error <= bound).all()), (
            f"{name}: error {error.max().item():.3g} past the TF32 bound"
        )


def _int8_case(rows, k, n, seed):
    gen = generator(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    packed, compensation = int8.pack_int8_weight(w)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    return w, packed.to(DEVICE), compensation.to(DEVICE), scale


# (rows, K, N) per int8 tile configuration: two or more row tiles where the configuration takes
# that many rows (the 128 x 128 one), two or more column tiles and K steps in each.
INT8_SHAPES = {
    "16x64x128": (13, 300, 70),
    "64x128x64": (40, 150, 200),
    "128x128x32": (130, 150, 130),
}


def _tile_name(rows):
    blocks = dict(configs.int8_gemm(rows).blocks)
    return f"{blocks['BLOCK_M']}x{blocks['BLOCK_N']}x{blocks['BLOCK_K']}"


@pytest.mark.parametrize("tiles", list(INT8_SHAPES))
def test_int8_mm_reaches_every_tile_and_step(tiles):
    rows, k, n = INT8_SHAPES[tiles]
    assert _tile_name(rows) == tiles
    w, packed, compensation, _ = _int8_case(rows, k, n, seed=rows * k)
    a = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=generator(n))
    out = triton_int8.int8_mm(a.to(DEVICE), packed, compensation, k)
    assert torch.equal(out.cpu().long(), a.long() @ w.long().T)


@pytest.mark.parametrize("tiles", list(INT8_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weight_only_reaches_every_tile_and_step(tiles, dtype):
    rows, k, n = INT8_SHAPES[tiles]
    w, packed, compensation, scale = _int8_case(rows, k, n, seed=rows + k)
    gen = generator(n)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    y = triton_int8.int8_linear(
        x.to(DEVICE), packed, compensation, k, scale.to(DEVICE), bias.to(DEVICE), None, False
    )
    ref = fake_quant_linear(x, w, scale, bias, quantize_input=False)
    # fp32 products and sums, one rounding to the output dtype (two ulps for the sum's order).
    tol = {torch.float32: 1e-5, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    torch.testing.assert_close(y.cpu(), ref, rtol=tol, atol=tol)


def _rounded_as_the_kernel(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 `y` rounded to `dtype` as the kernel's store rounds it: to nearest even on a GPU, but
    toward zero for bf16 in Triton 3.8's interpreter (its fp32 -> bf16 cast drops the low bits)."""
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        return (y.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return y.to(dtype)


@pytest.mark.parametrize("k", [1100, 2 * 1024 + 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_w8a8_quantizes_rows_longer_than_one_step(k, dtype):
    """More than 1024 features: two or three steps of the row quantization's loops (the scale's
    maximum and the rounding), then the 128 x 128 GEMM over many K steps; exactly fake
    quantization's result (no bias: nothing a fused multiply-add could round differently)."""
    rows, n = 130, 40
    step = dict(configs.quantize_rows(k).blocks)["BLOCK_K"]
    assert k > step
    w, packed, compensation, scale = _int8_case(rows, k, n, seed=k)
    gen = generator(k + 1)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    x[:, -1] = 50.0  # each row's maximum in its last step: a scale from the first step is wrong
    input_scale = torch.rand(k, generator=gen) + 0.5
    y = triton_int8.int8_linear(
        x.to(DEVICE), packed, compensation, k, scale.to(DEVICE), None, input_scale.to(DEVICE), True
    )
    exact = fake_quant_linear(x.float(), w, scale, None, input_scale, quantize_input=True)
    assert y.dtype == dtype
    assert torch.equal(y.cpu(), _rounded_as_the_kernel(exact, dtype))
