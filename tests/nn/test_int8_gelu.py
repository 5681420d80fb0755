"""The GELU epilogue of int8_linear (``activation="gelu"``), on the CPU kernels under every
instruction set level and on the Triton kernels (by their launcher, under the interpreter without
a GPU): against torch eager's ``F.gelu`` of the same fake quantization, in every dtype, on odd
sizes; its autograd, opcheck, torch.compile and bad input; and `quantize_`'s fusion of
``nn.Linear`` + ``nn.GELU()``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.cpu_isa import supported_cpu_isas
from helpers.int8_reference import fake_quant_linear, quantize_rows
from helpers.rng import generator
from torch import nn

from fastopt import _extension
from fastopt.functional import int8
from fastopt.nn import Int8Linear, quantize_
from fastopt.triton import int8_linear as triton_int8

# (rows, K, N): one row, odd K and N, a second row tile and a K tail, empty rows.
SHAPES = [(1, 37, 21), (7, 131, 48), (33, 256, 17), (0, 20, 12)]
# The epilogue rounds once from fp32: one unit in the last place of the output dtype, and
# torch's own fp32 gelu is within 1.1e-6 of the exact one (ours within 1.4e-6).
TOLERANCE = {
    torch.float32: {"rtol": 1.3e-6, "atol": 4e-6},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 1e-5},
    torch.float16: {"rtol": 2e-3, "atol": 1e-5},
}


def case(rows, k, n, seed, dtype=torch.float32):
    """An int8 weight, its packing, scales that give outputs of a few units (where GELU bends),
    and a biased input."""
    gen = generator(seed)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
    scale = (torch.rand(n, generator=gen) + 0.5) * 2 / (127 * max(k, 1) ** 0.5)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype)
    return w, scale, x, bias


def gelu_reference(x, w, scale, bias, input_scale, quantize_input):
    """torch eager: F.gelu of the fp32 fake-quantized output, cast to the input's dtype."""
    pre = fake_quant_linear(x.float(), w, scale, bias, input_scale, quantize_input)
    return F.gelu(pre).to(x.dtype)


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31, ()))


@pytest.mark.parametrize(("rows", "k", "n"), SHAPES)
@pytest.mark.parametrize("quantize_input", [True, False], ids=["w8a8", "weight-only"])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_epilogue_at_every_isa_level(cpu_isa, rows, k, n, quantize_input, bias):
    w, scale, x, b = case(rows, k, n, fresh_seed())
    b = b if bias else None
    packed, compensation = int8.pack_int8_weight(w)
    args = (x, packed, compensation, k, scale, b, None, quantize_input)
    y = torch.ops.fastopt.int8_linear(*args, "gelu")
    reference = gelu_reference(x, w, scale, b, None, quantize_input)
    torch.testing.assert_close(y, reference, **TOLERANCE[torch.float32])
    # The pre-activation output is the same with and without the epilogue.
    torch.testing.assert_close(y, F.gelu(torch.ops.fastopt.int8_linear(*args)), rtol=0, atol=2e-6)


def test_cpu_epilogue_gives_the_same_bits_at_every_level():
    """W8A8's exact sums and the GELU's multiply-adds, fused on every level (an instruction, or
    fmaf), give the same bits everywhere (weight-only sums in fp32 in each level's order)."""
    w, scale, x, bias = case(19, 136, 40, fresh_seed())
    packed, compensation = int8.pack_int8_weight(w)
    args = (x, packed, compensation, 136, scale, bias, None, True, "gelu")
    module = _extension.cpu_module()
    previous = module.active_cpu_isa()
    outputs = {}
    try:
        for isa in supported_cpu_isas():
            module.set_cpu_isa(isa)
            outputs[isa] = torch.ops.fastopt.int8_linear(*args)
    finally:
        module.set_cpu_isa(previous)
    for isa, y in outputs.items():
        assert torch.equal(y, outputs["baseline"]), isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("smoothing", [False, True])
def test_cpu_epilogue_in_every_dtype(dtype, smoothing):
    seed = fresh_seed()
    w, scale, x, bias = case(9, 70, 35, seed, dtype)
    input_scale = torch.rand(70, generator=generator(seed + 1)) + 0.5 if smoothing else None
    packed, compensation = int8.pack_int8_weight(w)
    y = int8.int8_linear(
        x.reshape(3, 3, 70), packed, compensation, 70, scale, bias, input_scale, activation="gelu"
    )
    assert y.dtype == dtype and y.shape == (3, 3, 35)
    reference = gelu_reference(x, w, scale, bias, input_scale, True)
    torch.testing.assert_close(y.reshape(9, 35), reference, **TOLERANCE[dtype])


@pytest.mark.parametrize("quantize_input", [True, False], ids=["w8a8", "weight-only"])
def test_cpu_float64_is_gelu_of_the_fp64_product(quantize_input):
    """float64 takes the fp64 path: exactly F.gelu of the fp64 fake quantization."""
    w, scale, x, bias = case(6, 45, 19, fresh_seed(), torch.float64)
    packed, compensation = int8.pack_int8_weight(w)
    y = torch.ops.fastopt.int8_linear(
        x, packed, compensation, 45, scale, bias, None, quantize_input, "gelu"
    )
    v = x
    row_scale = 1.0
    if quantize_input:
        v, row_scale = quantize_rows(x)
    reference = F.gelu((v @ w.double().T) * row_scale * scale.double() + bias)
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("quantize_input", [True, False], ids=["w8a8", "weight-only"])
@pytest.mark.parametrize("launcher", ["cpu kernel", "triton"])
def test_zero_in_features_gives_gelu_of_the_bias(launcher, quantize_input):
    bias = torch.randn(5, generator=generator(fresh_seed()))
    packed, compensation = int8.pack_int8_weight(torch.zeros(5, 0, dtype=torch.int8))
    op = torch.ops.fastopt.int8_linear if launcher == "cpu kernel" else triton_int8.int8_linear
    args = (torch.zeros(2, 3, 0), packed, compensation, 0, torch.ones(5))
    y = op(*args, bias, None, quantize_input, "gelu")
    torch.testing.assert_close(y, F.gelu(bias).expand(2, 3, 5), rtol=0, atol=2e-6)
    assert torch.equal(op(*args, None, None, quantize_input, "gelu"), torch.zeros(2, 3, 5))


@pytest.mark.parametrize(("rows", "k", "n"), SHAPES[:3])
@pytest.mark.parametrize("quantize_input", [True, False], ids=["w8a8", "weight-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_epilogue(rows, k, n, quantize_input, dtype):
    """The Triton kernels' GELU (tl.math.erf), by the launcher on CPU tensors in the interpreter
    (or CUDA ones on a GPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w, scale, x, bias = case(rows, k, n, fresh_seed(), dtype)
    packed, compensation = int8.pack_int8_weight(w)
    on = [t.to(device) for t in (x, packed, compensation, scale, bias)]
    y = triton_int8.int8_linear(*on[:3], k, *on[3:], None, quantize_input, "gelu")
    reference = gelu_reference(x, w, scale, bias, None, quantize_input)
    tolerance = TOLERANCE[dtype] if dtype != torch.float32 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.cpu(), reference, **tolerance)


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_layer_equals_linear_then_gelu(mode):
    torch.manual_seed(fresh_seed())
    linear = nn.Linear(50, 30)
    fused = Int8Linear.from_float(linear, mode=mode, activation="gelu")
    plain = Int8Linear.from_float(linear, mode=mode)
    assert repr(fused).endswith(f"mode={mode}, activation=gelu)")
    x = torch.randn(4, 50)
    torch.testing.assert_close(fused(x), F.gelu(plain(x)), rtol=0, atol=2e-6)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    back = fused.to_float()
    assert isinstance(back, nn.Sequential) and isinstance(back[1], nn.GELU)
    torch.testing.assert_close(back(x), F.gelu(plain.to_float()(x)))


@pytest.mark.parametrize("quantize_input", [True, False], ids=["w8a8", "weight-only"])
def test_gradients_match_linear_then_gelu(quantize_input):
    """Input and bias gradients through the epilogue: those of the unfused op followed by F.gelu
    (the backward recomputes the pre-activation output)."""
    w, scale, x, bias = case(8, 40, 24, fresh_seed())
    packed, compensation = int8.pack_int8_weight(w)
    grad = torch.randn(8, 24, generator=generator(fresh_seed()))
    results = []
    for fused in (True, False):
        xi, bi = x.clone().requires_grad_(), bias.clone().requires_grad_()
        args = (xi, packed, compensation, 40, scale, bi, None, quantize_input)
        y = (
            torch.ops.fastopt.int8_linear(*args, "gelu")
            if fused
            else F.gelu(torch.ops.fastopt.int8_linear(*args))
        )
        results.append(torch.autograd.grad(y, (xi, bi), grad))
    for fused_grad, unfused_grad in zip(*results, strict=True):
        torch.testing.assert_close(fused_grad, unfused_grad, rtol=1e-5, atol=1e-5)


def test_gradcheck_in_float64():
    """Weight-only fp64 is smooth in the input: gradcheck and gradgradcheck through GELU."""
    w, scale, x, bias = case(3, 12, 7, fresh_seed(), torch.float64)
    packed, compensation = int8.pack_int8_weight(w)

    def f(x, bias):
        return int8.int8_linear(
            x, packed, compensation, 12, scale, bias, mode="weight_only", activation="gelu"
        )

    inputs = (x.requires_grad_(), bias.requires_grad_())
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs, fast_mode=True)


@pytest.mark.parametrize("quantize_input", [True, False], ids=["w8a8", "weight-only"])
def test_opcheck(quantize_input):
    w, scale, x, bias = case(5, 37, 21, fresh_seed())
    packed, compensation = int8.pack_int8_weight(w)
    args = (x.requires_grad_(), packed, compensation, 37, scale, bias, None, quantize_input, "gelu")
    torch.library.opcheck(torch.ops.fastopt.int8_linear, args)


def test_bad_activation_is_refused():
    w, scale, x, bias = case(2, 8, 16, fresh_seed())
    packed, compensation = int8.pack_int8_weight(w)
    with pytest.raises(ValueError, match=r"fastopt.int8_linear: activation must be one of"):
        int8.int8_linear(x, packed, compensation, 8, scale, bias, activation="relu")
    with pytest.raises(RuntimeError, match=r"fastopt.int8_linear: activation must be 'none' or"):
        torch.ops.fastopt.int8_linear(x, packed, compensation, 8, scale, bias, None, True, "tanh")
    with pytest.raises(ValueError, match="activation must be one of"):
        triton_int8.int8_linear(x, packed, compensation, 8, scale, bias, None, True, "silu")
    with pytest.raises(ValueError, match="activation must be one of"):
        Int8Linear(8, 16, activation="GELU")
    with pytest.raises(ValueError, match="activation must be one of"):
        Int8Linear.from_float(nn.Linear(8, 16), activation="gelu_tanh")


class FeedForward(nn.Module):
    """A BERT-style FFN block nested in a model: the pattern quantize_ fuses."""

    def __init__(self, approximate="none", activation=None) -> None:
        super().__init__()
        act = activation if activation is not None else nn.GELU(approximate=approximate)
        self.ffn = nn.Sequential(nn.Linear(24, 40), act, nn.Linear(40, 24))
        self.norm = nn.LayerNorm(24)

    def forward(self, x):
        return self.norm(x + self.ffn(x))


def small_model(**kwargs) -> nn.Module:
    torch.manual_seed(fresh_seed())
    return nn.Sequential(FeedForward(**kwargs), nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 5))


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
def test_quantize_fuses_linear_gelu_and_keeps_the_outputs(mode):
    model = small_model()
    fused = quantize_(copy.deepcopy(model), mode=mode)
    unfused = quantize_(copy.deepcopy(model), mode=mode, fuse_activations=False)
    assert fused[0].ffn[0].activation == "gelu" and isinstance(fused[0].ffn[1], nn.Identity)
    assert fused[1].activation == "gelu" and isinstance(fused[2], nn.Identity)
    assert fused[0].ffn[2].activation == "none" and fused[3].activation == "none"
    assert isinstance(unfused[2], nn.GELU) and unfused[1].activation == "none"
    x = torch.randn(2, 6, 24, generator=generator(fresh_seed()))
    torch.testing.assert_close(fused(x), unfused(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "activation",
    [nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU()],
    ids=["gelu-tanh", "relu", "silu"],
)
def test_quantize_leaves_other_activations(activation):
    model = small_model(activation=activation)
    converted = quantize_(copy.deepcopy(model))
    assert converted[0].ffn[0].activation == "none"
    assert type(converted[0].ffn[1]) is type(activation)
    unfused = quantize_(copy.deepcopy(model), fuse_activations=False)
    x = torch.randn(3, 24, generator=generator(fresh_seed()))
    torch.testing.assert_close(converted(x), unfused(x), rtol=1e-5, atol=1e-5)


def test_quantize_does_not_fuse_a_filtered_linear():
    model = small_model()
    converted = quantize_(model, filter_fn=lambda module, name: name != "1")
    assert type(converted[1]) is nn.Linear and isinstance(converted[2], nn.GELU)
    assert converted[0].ffn[0].activation == "gelu"


def test_compiled_fused_model():
    model = quantize_(small_model())
    x = torch.randn(3, 24, generator=generator(fresh_seed())).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, model(x))
    (grad,) = torch.autograd.grad(y.sum(), x)
    (eager_grad,) = torch.autograd.grad(model(x).sum(), x)
    torch.testing.assert_close(grad, eager_grad)
