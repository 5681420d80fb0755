"""fastopt.nn.BlockSparseLinear and sparsify_: layouts (random, balanced, magnitude-pruned),
conversions from and to nn.Linear, state_dict, training with FusedAdam, opcheck,
torch.compile(fullgraph=True), and bad input."""

from __future__ import annotations

import io

import pytest
import torch
from helpers.blocksparse_reference import dense_weight, make_case, make_mask, stored_blocks
from torch import nn

import fastopt
import fastopt.functional.blocksparse as bs
from fastopt.nn import BlockSparseLinear, sparsify_


def linear(in_features, out_features, seed=0, bias=True) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


def block_scores(weight: torch.Tensor, block: int, norm: str) -> torch.Tensor:
    rows, cols = weight.shape[0] // block, weight.shape[1] // block
    scores = torch.empty(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            b = weight[r * block : (r + 1) * block, c * block : (c + 1) * block].double()
            scores[r, c] = b.norm() if norm == "l2" else b.abs().sum()
    return scores


def test_random_layout_density_and_repr():
    layer = BlockSparseLinear(128, 64, block_size=16, density=0.25)
    assert layer.layout.shape == (4, 8) and layer.layout.dtype == torch.bool
    assert int(layer.layout.sum()) == 8 == layer.values.shape[0]
    assert layer.values.shape[1:] == (16, 16) and layer.bias.shape == (64,)
    assert "block_size=16" in repr(layer) and "density=0.25" in repr(layer)


def test_balanced_layout_has_equal_blocks_per_row():
    layer = BlockSparseLinear(256, 64, block_size=32, density=0.5, balanced=True)
    assert layer.layout.sum(1).tolist() == [4, 4]


@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("balanced", [False, True])
def test_from_dense_keeps_exactly_the_top_blocks(norm, balanced):
    dense = linear(96, 64, seed=1)
    layer = BlockSparseLinear.from_dense(dense, 16, 0.5, norm=norm, balanced=balanced)
    scores = block_scores(dense.weight, 16, norm)
    if balanced:  # 3 of the 6 blocks of each of the 4 block rows
        threshold = scores.sort(1, descending=True).values[:, 2:3]
        expected = scores >= threshold
    else:  # 12 of the 24 blocks
        expected = scores >= scores.flatten().sort(descending=True).values[11]
    assert torch.equal(layer.layout, expected)
    assert torch.equal(layer.values, stored_blocks(dense.weight.detach(), expected, 16))
    assert torch.equal(layer.bias, dense.bias)


def test_to_dense_round_trip():
    dense = linear(64, 48, seed=2)
    full = torch.ones(3, 4, dtype=torch.bool)
    back = BlockSparseLinear.from_dense(dense, 16, layout=full).to_dense()
    assert isinstance(back, nn.Linear)
    assert torch.equal(back.weight, dense.weight) and torch.equal(back.bias, dense.bias)

    layer = BlockSparseLinear.from_dense(dense, 16, 0.5)
    masked = layer.to_dense()
    assert torch.equal(masked.weight, dense_weight(layer.values.detach(), layer.layout))
    x = torch.randn(5, 64)
    torch.testing.assert_close(layer(x), masked(x), rtol=1e-5, atol=1e-5)


def test_module_follows_dtype_and_device_moves():
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5).to(torch.bfloat16)
    assert layer.values.dtype == layer.bias.dtype == torch.bfloat16
    assert layer.layout.dtype == torch.bool and layer.crow_indices.dtype == torch.int64
    out = layer(torch.randn(3, 64, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 32)


def test_state_dict_round_trip_with_weights_only_load():
    source = BlockSparseLinear(64, 32, block_size=16, density=0.5)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert set(state) == {"values", "bias", "layout"}
    assert all(type(t) is torch.Tensor for t in state.values())

    target = BlockSparseLinear(64, 32, block_size=16, density=0.25)  # another layout and size
    target.load_state_dict(state)
    assert torch.equal(target.layout, source.layout)
    assert torch.equal(target.values, source.values)
    x = torch.randn(4, 64)
    assert torch.equal(target(x), source(x))


def test_load_state_dict_of_another_grid_fails_and_changes_nothing():
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    other = BlockSparseLinear(32, 32, block_size=16, density=0.5).state_dict()
    with pytest.raises(RuntimeError, match=r"block grid of \(2, 2\) cannot load into .*\(2, 4\)"):
        layer.load_state_dict(other)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def _layer_state(layer):
    """Everything a load could change: parameters and every buffer (index included)."""
    state = {name: t.clone() for name, t in layer.named_parameters()}
    state |= {name: t.clone() for name, t in layer.named_buffers()}
    return state


@pytest.mark.parametrize("strict", [True, False])
def test_load_state_dict_of_another_layout_without_values_fails_and_changes_nothing(strict):
    torch.manual_seed(11)
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5)
    before = _layer_state(layer)
    other_mask = ~layer.layout  # another layout on the same grid
    with pytest.raises(RuntimeError, match=r"missing values: .*include values in the state_dict"):
        layer.load_state_dict({"layout": other_mask, "bias": torch.randn(32)}, strict=strict)
    after = _layer_state(layer)
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert value.shape == before[key].shape and torch.equal(value, before[key]), key
    x = torch.randn(4, 64)
    assert torch.isfinite(layer(x)).all()


def test_half_on_cpu_says_which_tensor_and_what_to_use():
    torch.manual_seed(12)
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5).half()
    before = _layer_state(layer)
    message = r"values is torch\.float16, but the cpu kernels take float32, bfloat16 or float64; "
    with pytest.raises(RuntimeError, match=message + r"convert it with \.to\(torch\.float32\)"):
        layer(torch.randn(3, 64, dtype=torch.float16))
    index = bs.index_from_mask(layer.layout)
    x = torch.randn(3, 64, dtype=torch.float16)
    # The op called directly: the kernel's own check.
    with pytest.raises(RuntimeError, match=r"input is Half, but the CPU kernels take float32, bfl"):
        torch.ops.fastopt.blocksparse_linear_grad_values(
            torch.randn(3, 32, dtype=torch.float16), x, index.row_indices, index.col_indices, 16
        )
    for key, value in _layer_state(layer).items():
        assert torch.equal(value, before[key]), key
    # The advice works: .float() runs.
    assert layer.float()(x.float()).shape == (3, 32)


def test_sparsify_replaces_the_selected_linears():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 3))
    x = torch.randn(2, 64)
    sparsify_(model, block_size=16, density=0.5, filter_fn=lambda m, name: m.out_features >= 16)
    assert isinstance(model[0], BlockSparseLinear) and isinstance(model[2], BlockSparseLinear)
    assert type(model[3]) is nn.Linear
    expected = model[3](model[2].to_dense()(model[1](model[0].to_dense()(x))))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_sparsify_with_an_indivisible_layer_fails_before_changing_anything():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10))
    with pytest.raises(ValueError, match=r"^1: out_features=10 is not a multiple of block_size=16"):
        sparsify_(model, block_size=16, density=0.5)
    assert all(type(m) is nn.Linear for m in model)


def test_training_with_fused_adam_matches_torch_on_the_dense_masked_weight():
    """FusedAdam on the stored blocks against torch.optim.Adam on the same blocks, with the
    gradients of the fp64 dense reference: values and bias agree after every step."""
    mask = make_mask("random", 3, 4, torch.Generator().manual_seed(3))
    layer = BlockSparseLinear(64, 48, block_size=16, layout=mask)
    ref_values = layer.values.detach().double().clone().requires_grad_()
    ref_bias = layer.bias.detach().double().clone().requires_grad_()
    opt = fastopt.FusedAdam(layer.parameters(), lr=1e-2)
    ref_opt = torch.optim.Adam([ref_values, ref_bias], lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):
        x = torch.randn(6, 64, generator=gen)
        target = torch.randn(6, 48, generator=gen)
        for values, bias, opt_, forward in (
            (layer.values, layer.bias, opt, layer),
            (ref_values, ref_bias, ref_opt, None),
        ):
            opt_.zero_grad()
            if forward is None:
                out = x.double() @ dense_weight(values, mask).T + bias
            else:
                out = forward(x)
            ((out - target.to(out.dtype)) ** 2).mean().backward()
            opt_.step()
        torch.testing.assert_close(layer.values.double(), ref_values, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.bias.double(), ref_bias, rtol=1e-4, atol=1e-5)


def _op_args(dtype=torch.float32):
    mask = make_mask("empty_rows", 3, 4, torch.Generator().manual_seed(5))
    case = make_case(mask, 16, (2, 5), dtype, seed=6)
    return case, bs.index_from_mask(mask)


def test_opcheck_forward_with_autograd():
    case, index = _op_args()
    for bias in (case.bias, None):
        args = (case.x.requires_grad_(), case.values.requires_grad_(), bias, *index)
        torch.library.opcheck(torch.ops.fastopt.blocksparse_linear, args)


def test_opcheck_gradient_ops():
    case, index = _op_args()
    torch.library.opcheck(
        torch.ops.fastopt.blocksparse_linear_grad_input,
        (case.grad_out, case.values, index.ccol_indices, index.t_row_indices,
         index.t_block_indices),
    )  # fmt: skip
    torch.library.opcheck(
        torch.ops.fastopt.blocksparse_linear_grad_values,
        (case.grad_out, case.x, index.row_indices, index.col_indices, 16),
    )


def _second_order(x, values, bias, forward, first_wrt, weights):
    """d/d(x, values, bias) of <d loss / d first_wrt, weights>, loss = sum(forward(...)^2)."""
    loss = forward(x, values, bias).square().sum()
    wrt = {"input": x, "values": values}[first_wrt]
    (first,) = torch.autograd.grad(loss, wrt, create_graph=True)
    return first, torch.autograd.grad(
        (first * weights).sum(), (x, values, bias), materialize_grads=True
    )


@pytest.mark.parametrize("first_wrt", ["input", "values"])
def test_double_backward_matches_dense_fp64(first_wrt):
    """create_graph=True gives second-order gradients (through grad_input and grad_values), as
    the dense fp64 product with the masked weight does."""
    torch.manual_seed(41)
    layer = BlockSparseLinear(64, 48, block_size=16, density=0.5)
    mask = layer.layout
    x = torch.randn(2, 5, 64)
    weights = torch.randn(x.shape if first_wrt == "input" else layer.values.shape)
    leaves = [t.detach().clone().requires_grad_() for t in (x, layer.values, layer.bias)]
    first, second = _second_order(
        *leaves, lambda x, v, b: bs.blocksparse_linear(x, v, layer.index, b), first_wrt, weights
    )
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, layer.values, layer.bias)]
    ref_first, ref_second = _second_order(
        *ref_leaves,
        lambda x, v, b: x @ dense_weight(v, mask).T + b,
        first_wrt,
        weights.double(),
    )
    torch.testing.assert_close(first.double(), ref_first, rtol=1e-4, atol=1e-4)
    for name, got, ref in zip(("input", "values", "bias"), second, ref_second, strict=True):
        assert got.shape == ref.shape, name
        assert ref.abs().max() > 0, name  # each is a real second-order term
        torch.testing.assert_close(
            got.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item(), msg=name
        )


def test_double_backward_of_the_reported_case():
    torch.manual_seed(42)
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5)
    x = torch.randn(8, 64, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    (got,) = torch.autograd.grad(g.sum(), layer.values)
    w = dense_weight(layer.values.detach().double().requires_grad_(), layer.layout)
    xd = x.detach().double().requires_grad_()
    (gd,) = torch.autograd.grad(
        (xd @ w.T + layer.bias.double()).square().sum(), xd, create_graph=True
    )
    (ref,) = torch.autograd.grad(gd.sum(), w)
    ref = stored_blocks(ref, layer.layout, 16)
    assert ref.abs().max() > 1
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-3)


def test_compile_fullgraph_forward_and_backward():
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(3, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out = compiled(x)
    out.sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    ref = layer(x_ref)
    ref.sum().backward()
    assert torch.equal(out, ref) and torch.equal(x.grad, x_ref.grad)
    for g, p in zip(grads, layer.parameters(), strict=True):
        assert torch.equal(g, p.grad)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(in_features=100, out_features=64, density=0.5), "in_features=100 is not a multiple"),
        (dict(in_features=64, out_features=40, density=0.5), "out_features=40 is not a multiple"),
        (dict(layout=torch.ones(3, 3, dtype=torch.bool)), r"layout must be a mask of shape"),
        (dict(density=0.0), r"density must be in \(0, 1\]"),
        (dict(), "exactly one of density"),
        (dict(density=0.5, layout=torch.ones(2, 4, dtype=torch.bool)), "exactly one of density"),
        (dict(density=0.5, block_size=0), "block_size must be a positive int"),
    ],
    ids=["in", "out", "layout-shape", "density", "neither", "both", "block"],
)
def test_bad_construction_says_what_to_change(kwargs, message):
    args = dict(in_features=64, out_features=32, block_size=16) | kwargs
    with pytest.raises(ValueError, match=message):
        BlockSparseLinear(**args)


def test_forward_with_wrong_features_fails_and_changes_nothing():
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match="input must end in 64 features"):
        layer(torch.randn(3, 48))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


# nn.Linear itself (the reference, and to_dense) warns that initializing zero elements is a no-op.
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("in_features, out_features", [(0, 32), (32, 0)])
def test_zero_features_behave_like_nn_linear(in_features, out_features):
    layer = BlockSparseLinear(in_features, out_features, block_size=16, density=0.5)
    assert layer.values.shape == (0, 16, 16)
    dense = layer.to_dense()
    x = torch.randn(3, in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    out, ref = layer(x), dense(x_ref)
    assert torch.equal(out, ref)
    grad = torch.randn_like(out)
    out.backward(grad)
    ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad) and torch.equal(layer.bias.grad, dense.bias.grad)
