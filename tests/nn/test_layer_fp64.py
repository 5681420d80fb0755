"""float64 in both layers on the CPU, as nn.Linear takes it: forward and backward against an fp64
torch reference to 1e-10, and torch.autograd.gradcheck (gradgradcheck for block-sparse)."""

from __future__ import annotations

import pytest
import torch
from helpers.blocksparse_reference import make_case, make_mask, reference
from helpers.rng import generator
from torch import nn

import fastopt.functional as F
from fastopt.nn import BlockSparseLinear, Int8Linear

FP64 = {"rtol": 1e-10, "atol": 1e-10}


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("batch", [(), (0,), (7,), (2, 5)], ids=str)
def test_blocksparse_fp64_matches_the_dense_reference(cpu_isa, block, batch):
    mask = make_mask("empty_rows", 3, 4, torch.Generator().manual_seed(block))
    case = make_case(mask, block, batch, torch.float64, seed=block + len(batch))
    leaves = {
        name: t.clone().requires_grad_()
        for name, t in (("input", case.x), ("values", case.values), ("bias", case.bias))
    }
    out = F.blocksparse_linear(
        leaves["input"], leaves["values"], F.index_from_mask(mask), leaves["bias"]
    )
    out.backward(case.grad_out)
    expected = reference(case)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.detach(), expected["out"], **FP64)
    for name, leaf in leaves.items():
        torch.testing.assert_close(leaf.grad, expected[name], **FP64)


@pytest.mark.parametrize("fast_mode", [False, True], ids=["full", "fast"])
def test_blocksparse_layer_gradcheck(fast_mode):
    """gradcheck of input, values and bias; gradgradcheck (the double backward's own ops) in
    fast mode, which checks random projections of the Jacobian, the full one being slow."""
    torch.manual_seed(0)
    layout = torch.tensor([[True, False, True], [False, True, False]])
    layer = BlockSparseLinear(48, 32, block_size=16, layout=layout, dtype=torch.float64)
    x = torch.randn(3, 48, dtype=torch.float64, generator=generator(1), requires_grad=True)
    values, bias, index = layer.values, layer.bias, layer.index

    def f(x, values, bias):
        return F.blocksparse_linear(x, values, index, bias)

    if fast_mode:
        assert torch.autograd.gradgradcheck(f, (x, values, bias), fast_mode=True)
    else:
        assert torch.autograd.gradcheck(f, (x, values, bias))


def test_blocksparse_from_dense_fp64_layer():
    """An fp64 nn.Linear converts to an fp64 layer computing the masked product in fp64."""
    linear = nn.Linear(64, 32, dtype=torch.float64)
    layer = BlockSparseLinear.from_dense(linear, block_size=16, density=0.5)
    x = torch.randn(5, 64, dtype=torch.float64, generator=generator(2))
    assert layer.values.dtype == torch.float64
    torch.testing.assert_close(layer(x), layer.to_dense()(x), **FP64)


def _fp64_layer(mode: str, smoothing: bool) -> tuple[nn.Linear, Int8Linear]:
    torch.manual_seed(3)
    linear = nn.Linear(67, 33, dtype=torch.float64)
    absmax = torch.rand(67, generator=generator(4)) * 4 if smoothing else None
    return linear, Int8Linear.from_float(linear, mode=mode, input_absmax=absmax)


@pytest.mark.parametrize(
    ("mode", "smoothing"), [("dynamic", False), ("dynamic", True), ("weight_only", False)]
)
def test_int8_from_fp64_layer_computes_in_fp64(mode, smoothing):
    """Int8Linear.from_float of an fp64 layer gives fp64 outputs: the fake-quantized product
    computed in fp64 (rows quantized in fp64 in dynamic mode)."""
    _, q = _fp64_layer(mode, smoothing)
    x = torch.randn(2, 9, 67, dtype=torch.float64, generator=generator(5))
    y = q(x)
    assert y.dtype == torch.float64 and y.shape == (2, 9, 33)
    v = x * q.input_scale.double() if smoothing else x
    if mode == "dynamic":
        amax = v.abs().amax(-1, keepdim=True)
        row_scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
        v = torch.round(v / row_scale).clamp(-127, 127) * row_scale
    weight = q.weight.double() * q.weight_scale.double()[:, None]
    torch.testing.assert_close(y, v @ weight.T + q.bias, **FP64)


@pytest.mark.parametrize("smoothing", [False, True], ids=["plain", "smoothing"])
def test_int8_gradcheck_of_the_dequantized_path(smoothing):
    """gradcheck w.r.t. the input and the bias of the weight-only layer: the dequantized linear
    map, whose derivative is the one the layer's backward uses (in both modes)."""
    _, q = _fp64_layer("weight_only", smoothing=False)
    x = torch.randn(4, 67, dtype=torch.float64, generator=generator(6), requires_grad=True)
    bias = q.bias.clone().requires_grad_()
    args = (q.packed_weight, q.weight_compensation, 67, q.weight_scale)
    input_scale = torch.rand(67, generator=generator(9)) + 0.5 if smoothing else None

    def f(x, bias):
        return F.int8_linear(x, *args, bias, input_scale, mode="weight_only")

    assert torch.autograd.gradcheck(f, (x, bias))


def test_int8_dynamic_backward_is_the_dequantized_one():
    """Dynamic mode's backward is the straight-through one: the gradcheck-ed weight-only map's."""
    _, q = _fp64_layer("dynamic", smoothing=True)
    x = torch.randn(4, 67, dtype=torch.float64, generator=generator(7), requires_grad=True)
    grad = torch.randn(4, 33, dtype=torch.float64, generator=generator(8))
    q(x).backward(grad)
    weight = F.dequantize_weight(q.weight, q.weight_scale, q.input_scale, torch.float64)
    torch.testing.assert_close(x.grad, grad @ weight, **FP64)
