"""fastopt.functional.int8_linear calls the op below its autograd kernel when no graph is
recorded (the call overhead of small batches): the same outputs either way, and a graph exactly
when one of input and bias needs a gradient in grad mode."""

from __future__ import annotations

import pytest
import torch
from helpers.rng import generator

from fastopt.functional import int8


def case(seed):
    gen = generator(seed)
    w = torch.randint(-127, 128, (21, 37), dtype=torch.int8, generator=gen)
    packed, compensation = int8.pack_int8_weight(w)
    scale = torch.rand(21, generator=gen) * 0.01 + 1e-3
    return torch.randn(5, 37, generator=gen), packed, compensation, scale, torch.randn(21)


@pytest.mark.parametrize("activation", ["none", "gelu"])
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_graph_only_when_a_gradient_is_needed(mode, activation):
    x, packed, compensation, scale, bias = case(int(torch.randint(0, 2**31, ())))

    def call(x, bias):
        return int8.int8_linear(
            x, packed, compensation, 37, scale, bias, mode=mode, activation=activation
        )

    reference = call(x, bias)
    assert reference.grad_fn is None
    with torch.no_grad():
        y = call(x.requires_grad_(), bias)
    assert y.grad_fn is None and torch.equal(y, reference)
    with torch.inference_mode():
        assert torch.equal(call(x.detach(), bias), reference)
    x.requires_grad_(False)
    bias.requires_grad_()
    y = call(x, bias)  # only the bias needs a gradient: a graph all the same
    assert y.grad_fn is not None and torch.equal(y.detach(), reference)
    (grad,) = torch.autograd.grad(y.sum(), bias)
    # F.linear's bias gradient, through the activation: its derivative summed over the rows.
    pre = int8.int8_linear(x, packed, compensation, 37, scale, bias.detach(), mode=mode)
    ones = torch.ones_like(pre)
    slope = ones if activation == "none" else torch.ops.aten.gelu_backward(ones, pre)
    torch.testing.assert_close(grad, slope.sum(0))
