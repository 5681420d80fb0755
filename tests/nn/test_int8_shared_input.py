"""Query, key and value projections run as one Int8LinearGroup (`quantize_(...,
fuse_shared_inputs=True)`): the same bits as separate int8 layers in every dtype and mode, one
GEMM per input, recomputation when the parts read different or modified inputs, gradients,
state_dict, torch.compile, which layers are grouped, and bad input."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from helpers.rng import generator
from torch import nn

from fastopt.nn import Int8Linear, Int8LinearGroup, Int8LinearPart, quantize_


class Attention(nn.Module):
    """Self-attention (or cross-attention, given `memory`) with separate projections."""

    def __init__(self, hidden=37, heads=1, names=("query", "key", "value"), bias=True):
        super().__init__()
        self.names, self.heads = names, heads
        for name in names:
            setattr(self, name, nn.Linear(hidden, hidden, bias=bias))
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x, memory=None):
        query, key, value = (getattr(self, name) for name in self.names)
        source = x if memory is None else memory
        q, k, v = query(x), key(source), value(source)
        return self.out(F.scaled_dot_product_attention(q, k, v))


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31, ()))


def converted_pair(model, **kwargs):
    """(separate int8 layers, grouped) copies of `model`."""
    return (
        quantize_(copy.deepcopy(model), **kwargs),
        quantize_(copy.deepcopy(model), fuse_shared_inputs=True, **kwargs),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
@pytest.mark.parametrize("context", ["grad", "no_grad", "inference_mode"])
def test_same_bits_as_separate_layers(dtype, mode, context):
    torch.manual_seed(fresh_seed())
    model = Attention().to(dtype)
    separate, grouped = converted_pair(model, mode=mode)
    assert isinstance(grouped.query, Int8LinearPart)
    assert isinstance(grouped.query_key_value, Int8LinearGroup)
    x = torch.randn(2, 5, 37, generator=generator(fresh_seed())).to(dtype)
    scope = {"grad": torch.enable_grad, "no_grad": torch.no_grad}.get(context, torch.inference_mode)
    with scope():
        assert torch.equal(grouped(x), separate(x))
        assert grouped.query_key_value._outputs is None  # nothing held after the forward


def test_one_gemm_per_input():
    torch.manual_seed(fresh_seed())
    _, grouped = converted_pair(Attention())
    calls = []
    grouped.query_key_value.fused.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(4, 37, generator=generator(fresh_seed()))
    grouped(x)
    assert len(calls) == 1
    grouped(x)  # a second forward on the same input computes again
    assert len(calls) == 2


def test_cross_attention_and_modified_inputs_recompute():
    """Key and value reading another tensor, and an input changed in place between the calls,
    still give the separate layers' outputs."""
    torch.manual_seed(fresh_seed())
    separate, grouped = converted_pair(Attention())
    x = torch.randn(3, 37, generator=generator(fresh_seed()))
    memory = torch.randn(6, 37, generator=generator(fresh_seed()))
    with torch.no_grad():
        assert torch.equal(grouped(x, memory), separate(x, memory))
        part_query, part_key = grouped.query, grouped.key
        first = part_query(x)
        x.mul_(2)  # a new version: the key must not take the stale output
        assert torch.equal(part_key(x), separate.key(x))
        assert torch.equal(first, separate.query(x / 2))


def test_gradients_match_separate_layers():
    torch.manual_seed(fresh_seed())
    separate, grouped = converted_pair(Attention())
    x = torch.randn(2, 4, 37, generator=generator(fresh_seed()))
    grads = []
    for model in (separate, grouped):
        xi = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(xi).square().sum(), xi)
        grads.append(grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-6)


def test_projection_names_and_no_bias():
    torch.manual_seed(fresh_seed())
    model = Attention(hidden=20, names=("q_proj", "k_proj", "v_proj"), bias=False)
    separate, grouped = converted_pair(model)
    assert isinstance(grouped.q_proj_k_proj_v_proj, Int8LinearGroup)
    assert grouped.q_proj_k_proj_v_proj.fused.bias is None
    x = torch.randn(7, 20, generator=generator(fresh_seed()))
    assert torch.equal(grouped(x), separate(x))


def test_layers_left_separate():
    """Filtered out, SmoothQuant statistics, different sizes or bias: no group."""
    torch.manual_seed(fresh_seed())
    model = Attention()
    filtered = quantize_(
        copy.deepcopy(model), fuse_shared_inputs=True, filter_fn=lambda m, name: name != "key"
    )
    assert type(filtered.key) is nn.Linear and isinstance(filtered.query, Int8Linear)
    stats = {"query": torch.rand(37) + 0.1}
    smoothed = quantize_(copy.deepcopy(model), fuse_shared_inputs=True, input_absmax=stats)
    assert isinstance(smoothed.query, Int8Linear) and smoothed.query.input_scale is not None
    odd = copy.deepcopy(model)
    odd.value = nn.Linear(37, 37, bias=False)
    assert isinstance(quantize_(odd, fuse_shared_inputs=True).value, Int8Linear)
    unfused = quantize_(copy.deepcopy(model))
    assert not hasattr(unfused, "query_key_value")


def test_state_dict_round_trip():
    torch.manual_seed(fresh_seed())
    model = Attention()
    _, grouped = converted_pair(model)
    buffer = io.BytesIO()
    torch.save(grouped.state_dict(), buffer)
    buffer.seek(0)
    fresh = quantize_(Attention(), fuse_shared_inputs=True)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(3, 37, generator=generator(fresh_seed()))
    assert torch.equal(fresh(x), grouped(x))
    assert not any(key.startswith(("query.", "key.", "value.")) for key in grouped.state_dict())


def test_compiled_group():
    torch.manual_seed(fresh_seed())
    _, grouped = converted_pair(Attention())
    x = torch.randn(2, 3, 37, generator=generator(fresh_seed()))
    torch._dynamo.reset()
    compiled = torch.compile(grouped, fullgraph=True)
    torch.testing.assert_close(compiled(x), grouped(x))


def test_bad_input():
    layers = [nn.Linear(8, 4), nn.Linear(8, 4)]
    group = Int8LinearGroup.from_float(layers)
    with pytest.raises(ValueError, match="must add up to the fused layer's 8"):
        Int8LinearGroup(group.fused, [4, 5])
    with pytest.raises(ValueError, match="the same in_features"):
        Int8LinearGroup.from_float([nn.Linear(8, 4), nn.Linear(9, 4)])
    with pytest.raises(ValueError, match="a bias all or none"):
        Int8LinearGroup.from_float([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)])
    with pytest.raises(TypeError, match="takes nn.Linear layers"):
        Int8LinearGroup.from_float([nn.Linear(8, 4), Int8Linear(8, 4)])
