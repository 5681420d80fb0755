"""The Triton int8 kernels, by their launchers: under TRITON_INTERPRET=1 on CPU tensors (no GPU,
as in CI; tiny shapes, the interpreter is slow), on CUDA tensors where a GPU is present. The
references are the same eager ones as the CPU kernels'."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from helpers.int8_reference import fake_quant_linear
from helpers.rng import generator

from fastopt.functional import int8
from fastopt.triton import int8_linear as triton_int8

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
    reason="without a GPU the Triton kernels need TRITON_INTERPRET=1 (set by conftest.py)",
)

SHAPES = [(1, 37, 21), (3, 64, 48), (17, 5, 130)]  # (rows, K, N): odd / even, one past a tile


def weight_and_input(rows, k, n, seed, dtype=torch.float32):
    gen = generator(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    scale = torch.rand(n, generator=gen) * 0.01 + 1e-3
    bias = torch.randn(n, generator=gen).to(dtype)
    return w, x, scale, bias


def on_device(*tensors):
    return [t.to(DEVICE) if t is not None else None for t in tensors]


@pytest.mark.parametrize(("rows", "k", "n"), SHAPES)
def test_int8_mm_is_exact(rows, k, n):
    gen = generator(rows + k + n)
    a = torch.randint(-128, 128, (rows, k), dtype=torch.int8, generator=gen)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    a[0, :] = 127  # one row at the limit
    w[0, :] = -127
    out = triton_int8.int8_mm(*on_device(a, *int8.pack_int8_weight(w)), k)
    assert out.dtype == torch.int32
    assert torch.equal(out.cpu().long(), a.long() @ w.long().T)


@pytest.mark.parametrize(("rows", "k", "n"), SHAPES)
@pytest.mark.parametrize("smoothing", [False, True])
def test_w8a8_matches_fake_quantization(rows, k, n, smoothing):
    w, x, scale, bias = weight_and_input(rows, k, n, seed=rows * k)
    input_scale = torch.rand(k, generator=generator(5)) + 0.5 if smoothing else None
    packed, compensation = int8.pack_int8_weight(w)
    packed, compensation = on_device(packed, compensation)
    args = on_device(x, scale, bias, input_scale)
    y = triton_int8.int8_linear(args[0], packed, compensation, k, *args[1:], True)
    ref = fake_quant_linear(x, w, scale, bias, input_scale, quantize_input=True)
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("rows", "k", "n"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_matches_reference(rows, k, n, dtype):
    w, x, scale, bias = weight_and_input(rows, k, n, seed=rows + 2 * k, dtype=dtype)
    packed, compensation = int8.pack_int8_weight(w)
    x, packed, compensation, scale, bias = on_device(x, packed, compensation, scale, bias)
    y = triton_int8.int8_linear(x, packed, compensation, k, scale, bias, None, False)
    assert y.dtype == dtype and y.shape == (rows, n)
    ref = fake_quant_linear(x, w, scale, bias, quantize_input=False)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(y.cpu(), ref, rtol=tol, atol=tol)


def test_batch_shape_and_bad_input():
    w, x, scale, bias = weight_and_input(6, 12, 20, seed=9)
    packed, compensation = int8.pack_int8_weight(w)
    x, packed, compensation, scale, bias = on_device(x, packed, compensation, scale, bias)
    args = [x.reshape(2, 3, 12), packed, compensation, 12, scale, bias, None, True]
    assert triton_int8.int8_linear(*args).shape == (2, 3, 20)
    args[0] = args[0][..., :11]
    with pytest.raises(RuntimeError, match="input has 11 features"):
        triton_int8.int8_linear(*args)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_dispatch_to_triton_and_agree_with_cpu():
    from fastopt.nn import Int8Linear

    torch.manual_seed(0)
    q = Int8Linear.from_float(torch.nn.Linear(96, 40))
    x = torch.randn(33, 96)
    torch.testing.assert_close(q.cuda()(x.cuda()).cpu(), q.cpu()(x), rtol=1e-5, atol=1e-5)


def test_non_contiguous_arguments():
    """Strided scales and bias are read right; a non-contiguous packed weight is refused by the
    shared check (as the CPU kernel and the fake do), not read as if contiguous."""
    seed = int(torch.randint(0, 2**31, ()))
    w, x, scale, bias = weight_and_input(5, 40, 24, seed=seed)
    packed, compensation = int8.pack_int8_weight(w)
    x, packed, compensation, scale, bias = on_device(x, packed, compensation, scale, bias)
    strided_scale = torch.stack([scale, scale], dim=1)[:, 0]
    strided_bias = torch.stack([bias, bias], dim=1)[:, 1]
    assert not strided_scale.is_contiguous() and not strided_bias.is_contiguous()
    for quantize_input in (True, False):
        y = triton_int8.int8_linear(
            x, packed, compensation, 40, strided_scale, strided_bias, None, quantize_input
        )
        ref = fake_quant_linear(x, w, scale, bias, quantize_input=quantize_input)
        torch.testing.assert_close(y.cpu(), ref, rtol=1e-5, atol=1e-5)
    channels_last = packed.to(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    with pytest.raises(RuntimeError, match="packed_weight must be contiguous"):
        triton_int8.int8_linear(x, channels_last, compensation, 40, scale, bias, None, True)
    with pytest.raises(RuntimeError, match="packed_weight must be contiguous"):
        triton_int8.int8_mm(x.to(torch.int8), channels_last, compensation, 40)


@pytest.mark.parametrize("quantize_input", [True, False])
def test_zero_in_features(quantize_input):
    """in_features == 0: the bias broadcast (or zeros), and int8_mm's empty sums are zero."""
    bias = torch.randn(5, generator=generator(int(torch.randint(0, 2**31, ()))))
    packed, compensation = on_device(*int8.pack_int8_weight(torch.zeros(5, 0, dtype=torch.int8)))
    x, scale, bias = on_device(torch.zeros(2, 3, 0), torch.ones(5), bias)
    y = triton_int8.int8_linear(x, packed, compensation, 0, scale, bias, None, quantize_input)
    assert torch.equal(y.cpu(), bias.cpu().expand(2, 3, 5))
    y = triton_int8.int8_linear(x, packed, compensation, 0, scale, None, None, quantize_input)
    assert torch.equal(y.cpu(), torch.zeros(2, 3, 5))
    out = triton_int8.int8_mm(x[0].to(torch.int8), packed, compensation, 0)
    assert torch.equal(out.cpu(), torch.zeros(3, 5, dtype=torch.int32))


@triton.jit
def _tile_far_out(packed_ptr, out_ptr, groups, n_base, K, N, BLOCK_K: tl.constexpr):
    """Reads the tile of output channels [n_base, n_base + 16) of a packed weight whose block
    n_base // 16 is the one at packed_ptr: the block's offset from the (virtual) start of the
    weight is past 2**31, as in a packed weight over 2 GiB."""
    far = (n_base.to(tl.int64) // 16) * groups * 64
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = n_base + tl.arange(0, 16)
    tile = triton_int8._packed_weight_tile(packed_ptr - far, groups, offs_k, offs_n, K, N)
    tl.store(out_ptr + offs_k[:, None] * 16 + tl.arange(0, 16)[None, :], tile)


def test_packed_weight_offsets_past_2_gib():
    """Offsets into the packed weight are formed in int64: in int32, block * groups * 64 wraps
    for a weight over 2 GiB and the tile is read from the wrong address. In a subprocess: that
    read faults (a segfault in the interpreter, a sticky CUDA error on a GPU)."""
    check = "import test_int8_triton as t; t.read_a_tile_past_2_gib()"
    here = os.path.dirname(os.path.abspath(__file__))
    tests = os.path.dirname(here)
    path = os.pathsep.join([here, tests, os.path.dirname(tests), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", check], cwd=here, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]


def read_a_tile_past_2_gib():
    k, groups = 64, 16  # 1 KiB per block of 16 output channels
    n_base = 16 * (2**31 // (groups * 64))  # the first channel at byte offset 2**31
    w = torch.randint(-127, 128, (16, k), dtype=torch.int8, generator=generator(n_base % 1000))
    w = w[torch.randperm(16)]  # fresh rows each run
    packed, _ = int8.pack_int8_weight(w)
    packed, out = on_device(packed, torch.empty(k, 16, dtype=torch.int8))
    _tile_far_out[(1,)](packed, out, groups, n_base, k, n_base + 16, BLOCK_K=k)
    assert torch.equal(out.cpu(), w.T)
