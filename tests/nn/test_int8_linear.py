"""`fastopt.nn.Int8Linear` and `fastopt.functional.int8_linear` against torch eager: an fp64
`F.linear` on the float weights, and fake quantization with the same scales."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.int8_reference import fake_quant_linear, relative_error
from helpers.rng import generator
from torch import nn

from fastopt.functional import int8
from fastopt.nn import Int8Linear

ROWS = [1, 3, 16, 17, 512]
FEATURES = [(64, 48), (67, 33)]  # (in, out): even and odd


def make_linear(k, n, seed, bias=True, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def gaussian(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=generator(seed), dtype=torch.float64).to(dtype)


def layer_args(q: Int8Linear):
    return (
        q.packed_weight,
        q.weight_compensation,
        q.in_features,
        q.weight_scale,
        q.bias,
        q.input_scale,
    )


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("k", "n"), FEATURES)
@pytest.mark.parametrize("quantize_input", [True, False], ids=["w8a8", "weight-only"])
def test_matches_fake_quantization(cpu_isa, rows, k, n, quantize_input):
    """Same scales, same rounding: equal up to fp32 rounding of the epilogue."""
    q = Int8Linear.from_float(make_linear(k, n, seed=rows + k))
    x = gaussian((rows, k), seed=rows * k)
    y = torch.ops.fastopt.int8_linear(x, *layer_args(q), quantize_input)
    ref = fake_quant_linear(x, q.weight, q.weight_scale, q.bias, quantize_input=quantize_input)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
@pytest.mark.parametrize("rows", ROWS)
def test_close_to_float_linear(mode, rows):
    """Relative error at most 1e-2 against fp64 F.linear on the float weights, on Gaussian inputs:
    pooled over calls on independent inputs until 64 rows are seen, since a single row's error
    is itself a random number (8e-3 typical in dynamic mode at K=256, 1.2e-2 for some rows)."""
    linear = make_linear(256, 256, seed=rows)
    q = Int8Linear.from_float(linear, mode=mode)
    calls = [gaussian((rows, 256), seed=rows + 7 + i) for i in range(max(1, 64 // rows))]
    y = torch.cat([q(x) for x in calls])
    ref = F.linear(torch.cat(calls).double(), linear.weight.double(), linear.bias.double())
    assert relative_error(y, ref) <= 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_low_precision(dtype, mode):
    """bf16 / fp16 in and out: no worse than the fp32 layer plus twice the error of a plain
    torch F.linear run in that dtype, all against fp64."""
    linear = make_linear(96, 40, seed=1)
    x32 = gaussian((33, 96), seed=2)
    ref = F.linear(x32.double(), linear.weight.double(), linear.bias.double())
    fp32_error = relative_error(Int8Linear.from_float(linear, mode=mode)(x32), ref)
    low = linear.to(dtype)
    x = x32.to(dtype)
    y = Int8Linear.from_float(low, mode=mode)(x)
    assert y.dtype == dtype and y.shape == (33, 40)
    torch_error = relative_error(F.linear(x, low.weight, low.bias), ref)
    assert relative_error(y, ref) <= fp32_error + 2 * torch_error


def test_per_token_scales_isolate_an_outlier_row():
    """A row of huge values gets its own scale: the other rows come out bit for bit as without it,
    and the huge row itself is as accurate as any other."""
    linear = make_linear(128, 64, seed=3)
    q = Int8Linear.from_float(linear)
    x = gaussian((9, 128), seed=4)
    huge = x.clone()
    huge[5] *= 1e4
    y, y_huge = q(x), q(huge)
    keep = [i for i in range(9) if i != 5]
    assert torch.equal(y_huge[keep], y[keep])
    ref = F.linear(huge[5].double(), linear.weight.double(), linear.bias.double())
    assert relative_error(y_huge[5], ref) <= 1e-2


def test_zero_rows_and_no_bias():
    q = Int8Linear.from_float(make_linear(20, 12, seed=5, bias=False))
    x = gaussian((4, 20), seed=6)
    x[2] = 0
    y = q(x)
    assert torch.equal(y[2], torch.zeros(12))
    torch.testing.assert_close(y, fake_quant_linear(x, q.weight, q.weight_scale))


@pytest.mark.parametrize("shape", [(2, 3, 40), (40,), (0, 40), (2, 0, 40)])
def test_batch_shapes_like_nn_linear(shape):
    linear = make_linear(40, 24, seed=7)
    q = Int8Linear.from_float(linear)
    x = gaussian(shape, seed=8)
    y = q(x)
    assert y.shape == linear(x).shape
    if x.numel():
        torch.testing.assert_close(y, q(x.reshape(-1, 40)).reshape(y.shape))


def test_non_contiguous_input():
    q = Int8Linear.from_float(make_linear(32, 16, seed=9))
    x = gaussian((32, 10), seed=10).T  # [10, 32], transposed strides
    assert not x.is_contiguous()
    torch.testing.assert_close(q(x), q(x.contiguous()), rtol=0, atol=0)


def test_smoothquant_calibration_tames_outlier_channels():
    """Activations with a few huge channels (as in LLMs): per-token scales alone lose the small
    channels; calibrated smoothing moves the outliers into the weight and wins it back."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 32))
    channel_gain = torch.ones(128)
    channel_gain[[3, 70, 101]] = 60.0

    def batch(seed):
        return gaussian((64, 128), seed) * channel_gain

    stats = fastopt_nn().calibrate(model, [batch(s) for s in range(4)])
    assert set(stats) == {"0", "2"} and stats["0"].shape == (128,)
    assert stats["0"][3] > 20 * stats["0"][0]
    plain = fastopt_nn().quantize_(copy_of(model), filter_fn=lambda m, name: name == "0")
    smooth = fastopt_nn().quantize_(
        copy_of(model), input_absmax=stats, filter_fn=lambda m, n: n == "0"
    )
    assert isinstance(smooth[0], Int8Linear) and smooth[0].input_scale is not None
    assert isinstance(smooth[2], nn.Linear) and not isinstance(smooth[2], Int8Linear)
    x = batch(100)
    ref = model.double()(x.double())
    smooth_error, plain_error = relative_error(smooth(x), ref), relative_error(plain(x), ref)
    assert smooth_error < 0.7 * plain_error, (smooth_error, plain_error)
    # The smoothed layer still computes its fake quantization exactly.
    q = smooth[0]
    torch.testing.assert_close(
        q(x), fake_quant_linear(x, q.weight, q.weight_scale, q.bias, q.input_scale)
    )


def fastopt_nn():
    import fastopt.nn

    return fastopt.nn


def copy_of(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("smoothing", [False, True])
def test_gradients_flow_to_the_input_only(smoothing):
    """d/dx of the layer with the activation rounding taken as identity: grad @ W, where W is the
    dequantized weight (divided by the smoothing scale, which the input was multiplied by)."""
    linear = make_linear(48, 20, seed=12)
    absmax = gaussian((48,), seed=15).abs() + 0.1 if smoothing else None
    q = Int8Linear.from_float(linear, input_absmax=absmax)
    x = gaussian((2, 5, 48), seed=13).requires_grad_()
    grad_out = gaussian((2, 5, 20), seed=14)
    q(x).backward(grad_out)
    dequantized = q.weight.double() * q.weight_scale.double()[:, None]
    if smoothing:
        dequantized = dequantized * q.input_scale.double()
    torch.testing.assert_close(x.grad, (grad_out.double() @ dequantized).float())
    assert all(not b.requires_grad for b in q.buffers())
    assert list(q.parameters()) == []


def test_from_float_to_float_round_trip():
    linear = make_linear(30, 17, seed=15, dtype=torch.bfloat16)
    q = Int8Linear.from_float(linear)
    back = q.to_float()
    assert isinstance(back, nn.Linear) and back.weight.dtype == torch.bfloat16
    assert torch.equal(back.bias, linear.bias)
    step = q.weight_scale[:, None]  # rounding moves each weight by at most half a step
    error = (back.weight.float() - linear.weight.float()).abs()
    assert (error <= step / 2 + 1e-2 * linear.weight.float().abs()).all()


def test_to_float_folds_the_smoothing_back():
    linear = make_linear(64, 24, seed=16)
    absmax = gaussian((64,), seed=17).abs() * 10 + 0.1
    back = Int8Linear.from_float(linear, input_absmax=absmax).to_float()
    assert relative_error(back.weight, linear.weight) < 1e-2
    assert torch.equal(back.bias, linear.bias)


def test_extra_repr_and_quantize_filter():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4, bias=False))
    fastopt_nn().quantize_(model, mode="weight_only", filter_fn=lambda m, name: m.out_features == 4)
    assert isinstance(model[0], nn.Linear) and not isinstance(model[0], Int8Linear)
    assert repr(model[1]) == (
        "Int8Linear(in_features=8, out_features=4, bias=False, mode=weight_only)"
    )


def test_weight_only_default_rows():
    """Dynamic mode's switch to the weight-only kernel, per device."""
    assert not int8.uses_weight_only_path(1, torch.device("cpu"))
    assert int8.uses_weight_only_path(16, torch.device("cuda"))
    assert not int8.uses_weight_only_path(17, torch.device("cuda"))


def test_quantize_leaves_multihead_attention_out_proj_alone():
    """nn.MultiheadAttention reads out_proj.weight itself, so quantize_ must only convert layers
    that are exactly nn.Linear; the encoder layer still runs and stays close to fp32."""
    from fastopt.nn import quantize_

    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    model = nn.TransformerEncoderLayer(64, 4, dim_feedforward=128, dropout=0.0, batch_first=True)
    model.eval()
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        expected = model(x)
        quantize_(model)
        assert isinstance(model.linear1, Int8Linear) and isinstance(model.linear2, Int8Linear)
        assert type(model.self_attn.out_proj) is not Int8Linear
        assert model.self_attn.out_proj.weight.dtype == torch.float32
        y = model(x)
    assert relative_error(y, expected) < 0.02
    model.train()  # the regular path with dropout 0: the same computation
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)
    encoder = nn.TransformerEncoder(model, num_layers=2, enable_nested_tensor=False).eval()
    with torch.no_grad():
        assert encoder(x).shape == x.shape


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors is a no-op")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
@pytest.mark.parametrize("shape", [(2, 0), (3, 4, 0), (0,), (0, 0)])
def test_zero_in_features_like_nn_linear(bias, mode, shape):
    """in_features == 0, as nn.Linear allows: the output is the bias broadcast, or zeros."""
    linear = make_linear(0, 5, seed=int(torch.randint(0, 2**31, ())), bias=bias)
    if bias:
        nn.init.normal_(linear.bias)
    q = Int8Linear.from_float(linear, mode=mode)
    assert torch.equal(q.weight_scale, torch.ones(5))
    x = torch.zeros(shape)
    y = q(x)
    torch.testing.assert_close(y, linear(x), rtol=0, atol=0)
    assert y.shape == (*shape[:-1], 5)
    y = Int8Linear(0, 5, bias=bias, mode=mode)(x)
    assert torch.equal(y, torch.zeros(*shape[:-1], 5))


def test_int8_mm_with_zero_in_features():
    rows = int(torch.randint(1, 40, ()))
    out = int8.int8_mm(
        torch.zeros(rows, 0, dtype=torch.int8),
        *int8.pack_int8_weight(torch.zeros(3, 0, dtype=torch.int8)),
        0,
    )
    assert out.dtype == torch.int32 and torch.equal(out, torch.zeros(rows, 3, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 48), (48,), (7, 48)])
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_functional_bias_gradient_matches_f_linear(dtype, shape, mode):
    """A bias that requires grad gets F.linear's gradient (grad_output summed over all but the
    last dimension, in the bias dtype), alongside the input's."""
    seed = int(torch.randint(0, 2**31, ()))
    q = Int8Linear.from_float(make_linear(48, 20, seed=seed), mode=mode)
    bias = gaussian((20,), seed + 1, dtype).requires_grad_()
    x = gaussian(shape, seed + 2, dtype).requires_grad_()
    grad_out = gaussian((*shape[:-1], 20), seed + 3, dtype)
    args = (q.packed_weight, q.weight_compensation, 48, q.weight_scale)
    int8.int8_linear(x, *args, bias, mode=mode).backward(grad_out)
    dequantized = (q.weight.float() * q.weight_scale[:, None]).to(dtype)
    ref_bias = bias.detach().clone().requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    F.linear(ref_x, dequantized, ref_bias).backward(grad_out)
    assert bias.grad is not None and bias.grad.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(bias.grad, ref_bias.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=tol, atol=tol)
