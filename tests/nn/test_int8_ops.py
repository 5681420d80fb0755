"""The int8 ops and layer as torch machinery sees them: opcheck, torch.compile(fullgraph=True),
state_dict round trips through `torch.load(weights_only=True)`, and bad input."""

from __future__ import annotations

import io

import pytest
import torch
from helpers.rng import generator
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from fastopt.functional import int8
from fastopt.nn import Int8Linear, quantize_


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=generator(seed)).to(dtype)


def layer(k=37, n=21, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    return Int8Linear.from_float(nn.Linear(k, n, bias=bias), **kwargs)


def op_args(q, x, quantize_input):
    return (x, q.packed_weight, q.weight_compensation, q.in_features, q.weight_scale, q.bias,
            q.input_scale, quantize_input)  # fmt: skip


@pytest.mark.parametrize("quantize_input", [True, False], ids=["w8a8", "weight-only"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("smoothing", [False, True])
def test_opcheck_int8_linear(quantize_input, bias, smoothing):
    q = layer(bias=bias, input_absmax=randn(37, seed=1).abs() + 0.1 if smoothing else None)
    x = randn(2, 5, 37, seed=2).requires_grad_()
    torch.library.opcheck(torch.ops.fastopt.int8_linear, op_args(q, x, quantize_input))


def test_opcheck_int8_mm():
    w = torch.randint(-127, 128, (19, 13), dtype=torch.int8, generator=generator(3))
    a = torch.randint(-128, 128, (7, 13), dtype=torch.int8, generator=generator(4))
    torch.library.opcheck(torch.ops.fastopt.int8_mm, (a, *int8.pack_int8_weight(w), 13))


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_compile_fullgraph(mode):
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8))
    quantize_(model, mode=mode)
    x = randn(3, 24, seed=5).requires_grad_()
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    y = compiled(x)
    assert counter.frame_count == 1
    torch.testing.assert_close(y, model(x))  # inductor fuses GELU: fp32 rounding apart
    (grad,) = torch.autograd.grad(y.sum(), x)
    (eager_grad,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(grad, eager_grad)


@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_state_dict_round_trip(bias, smoothing):
    q = layer(bias=bias, input_absmax=randn(37, seed=6).abs() + 0.1 if smoothing else None)
    state = q.state_dict()
    expected = {"weight", "weight_scale"} | ({"bias"} if bias else set())
    assert set(state) == expected | ({"input_scale"} if smoothing else set())
    assert state["weight"].dtype == torch.int8 and state["weight"].shape == (21, 37)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    fresh = Int8Linear(37, 21, bias=bias, smoothing=smoothing)
    fresh.load_state_dict(loaded)
    x = randn(4, 37, seed=7)
    assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.packed_weight, q.packed_weight)
    assert torch.equal(fresh.weight_compensation, q.weight_compensation)


def test_state_dict_of_a_quantized_model():
    model = quantize_(nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 3)))
    other = quantize_(nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 3)))
    other.load_state_dict(model.state_dict())
    x = randn(2, 10, seed=8)
    assert torch.equal(other(x), model(x))
    assert set(model.state_dict()) == {
        f"{i}.{key}" for i in (0, 1) for key in ("weight", "weight_scale", "bias")
    }


def test_dtype_conversion_keeps_float32_scales():
    q = layer(input_absmax=randn(37, seed=9).abs() + 0.1)
    scale = q.weight_scale.clone()
    q.to(torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16
    assert q.weight_scale.dtype == q.input_scale.dtype == torch.float32
    assert torch.equal(q.weight_scale, scale)
    assert q(randn(3, 37, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_load_state_dict_rejects_a_wrong_weight_and_keeps_the_layer():
    q = layer()
    before = {name: t.clone() for name, t in q.named_buffers()}
    bad = dict(q.state_dict(), weight=torch.zeros(21, 36, dtype=torch.int8))
    with pytest.raises(RuntimeError, match=r"weight must be int8 \[21, 37\]"):
        q.load_state_dict(bad)
    missing = {k: v for k, v in q.state_dict().items() if k != "weight"}
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        q.load_state_dict(missing)
    for name, t in q.named_buffers():
        assert torch.equal(t, before[name]), name


BAD_INPUTS = [
    # float64 runs on the CPU, but this layer's bias is float32: the dtypes must agree.
    (
        lambda: randn(4, 37, dtype=torch.float64),
        r"bias must be a \[21\] tensor of the input's dtype",
    ),
    (
        lambda: torch.ones(4, 37, dtype=torch.int32),
        "input is torch.int32, but the cpu kernels take",
    ),
    (lambda: randn(4, 36), r"input has 36 features .* in_features=37; pass an input of shape"),
    (lambda: randn(4, 38), "input has 38 features"),  # same packed size: caught by in_features
    (lambda: randn(4, 41), "input has 41 features"),
    (lambda: torch.tensor(1.0), "input has 0 features"),
]


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
@pytest.mark.parametrize(("make_input", "message"), BAD_INPUTS)
def test_bad_input_says_what_and_changes_nothing(mode, make_input, message):
    q = layer(mode=mode)
    before = {name: t.clone() for name, t in q.named_buffers()}
    x = make_input()
    x_before = x.clone()
    with pytest.raises(RuntimeError, match=message):
        q(x)
    assert torch.equal(x, x_before)
    for name, t in q.named_buffers():
        assert torch.equal(t, before[name]), name


def test_bad_op_arguments():
    q = layer()
    x = randn(2, 37)
    args = list(op_args(q, x, True))
    cases = [
        (4, torch.ones(21, dtype=torch.float64), "weight_scale must be a float32 \\[21\\]"),
        (5, torch.ones(21, dtype=torch.bfloat16), "bias must be a \\[21\\] tensor of the input"),
        (6, torch.ones(36), "input_scale must be a float32 \\[37\\]"),
        (3, 41, "input has 37 features .* in_features=41"),
        (3, 33, "input has 37 features .* in_features=33"),
        (2, torch.zeros(40, dtype=torch.int32), "weight_compensation must be the int32"),
        (1, torch.zeros(2, 10, 16, 4), "packed_weight must be the int8"),
        (
            1,
            q.packed_weight.to(memory_format=torch.channels_last),
            "packed_weight must be contiguous .* pass packed_weight.contiguous",
        ),
    ]
    for index, value, message in cases:
        bad = list(args)
        bad[index] = value
        with pytest.raises(RuntimeError, match=message):
            int8.int8_linear(*bad[:7])
        with pytest.raises(RuntimeError, match=message):  # the fake says the same
            torch.ops.fastopt.int8_linear(*[a.to("meta") if torch.is_tensor(a) else a for a in bad])
        # The op called directly skips the Python checks; the kernel's own still refuse it.
        with pytest.raises(RuntimeError, match=r"^fastopt\.int8_linear: "):
            torch.ops.fastopt.int8_linear(*bad)
    with pytest.raises(RuntimeError, match="input must be a 2-d int8 tensor"):
        int8.int8_mm(x, q.packed_weight, q.weight_compensation, 37)


def test_bad_construction():
    with pytest.raises(ValueError, match="mode must be one of"):
        layer(mode="static")
    with pytest.raises(ValueError, match="only applies to mode='dynamic'"):
        layer(mode="weight_only", input_absmax=torch.ones(37))
    with pytest.raises(ValueError, match=r"input_absmax must have one entry per input feature"):
        layer(input_absmax=torch.ones(36))
    with pytest.raises(TypeError, match="from_float takes an nn.Linear"):
        Int8Linear.from_float(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match="mode must be 'dynamic' or 'weight_only'"):
        q = layer()
        int8.int8_linear(randn(2, 37), *op_args(q, None, True)[1:7], mode="w4")


def test_channels_last_keeps_the_packed_weight_contiguous():
    """`.to(memory_format=torch.channels_last)` restrides every 4-d tensor of a model; the layer
    keeps its packed weight contiguous, so the forward still runs and agrees."""
    seed = int(torch.randint(0, 2**31, ()))
    q = layer(seed=seed)
    x = randn(5, 37, seed=seed)
    expected = q(x)
    assert q.to(memory_format=torch.channels_last) is q
    assert q.packed_weight.is_contiguous()
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)
    model = nn.Sequential(layer(seed=seed), nn.ReLU()).to(memory_format=torch.channels_last)
    torch.testing.assert_close(model[0](x), expected, rtol=0, atol=0)
