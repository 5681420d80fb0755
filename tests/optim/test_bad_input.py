"""Every fused optimizer (FusedAdam / FusedAdamW / FusedRMSprop / FusedAdagrad / FusedAdadelta):
bad input gets an error that names the problem (and the param group and param), raised before
anything changes; constructor arguments are checked as torch checks them; the unusual-but-valid
dense layouts (transposed, channels_last, ...) work and match torch."""

from __future__ import annotations

import math
import re

import pytest
import torch
from helpers.optim_cases import OPTIMIZERS, RICH
from helpers.optim_compare import assert_matches_reference
from helpers.optim_pairs import make_param_pairs, optimizer_pair, set_grads
from helpers.rng import generator
from helpers.snapshot import assert_unchanged, snapshot
from helpers.tolerances import FP32
from torch import nn

import fastopt
from fastopt import _extension


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.requires_grad_()


def _sparse_grad():
    p = _leaf(torch.randn(10, 3))
    return [p], [torch.randn(10, 3).to_sparse()]


def _complex_param():
    p = _leaf(torch.randn(6, dtype=torch.complex64))
    return [p], [torch.randn(6, dtype=torch.complex64)]


def _mixed_devices():
    a, b = _leaf(torch.randn(5)), _leaf(torch.randn(5, device="meta"))
    return [a, b], [torch.randn(5), torch.randn(5, device="meta")]


def _strided_view():
    p = _leaf(torch.randn(8, 8)[:, ::2])  # a leaf that views every other column
    assert p.is_leaf and not p.is_contiguous()
    return [p], [torch.randn(8, 4)]


def _grad_with_other_strides():
    p = _leaf(torch.randn(4, 6))
    return [p], [torch.randn(6, 4).t()]


def _float8_param():
    p = _leaf(torch.randn(6).to(torch.float8_e4m3fn))
    return [p], [torch.randn(6).to(torch.float8_e4m3fn)]


BAD = {
    "sparse-grad": (_sparse_grad, "sparse gradient"),
    "complex": (_complex_param, "complex"),
    "mixed-devices": (_mixed_devices, "is on meta but param"),
    "strided-view": (_strided_view, "not stored densely"),
    "grad-strides": (_grad_with_other_strides, "strides"),
    "float8": (_float8_param, "float8_e4m3fn"),
}

# Adagrad takes sparse grads (test_sparse_adagrad.py).
BAD_CASES = [
    (name, case)
    for name in OPTIMIZERS
    for case in BAD
    if not (name == "Adagrad" and case == "sparse-grad")
]


@pytest.mark.parametrize(("name", "case"), BAD_CASES)
@pytest.mark.parametrize("position", ["only-group", "first-of-two", "second-of-two"])
def test_bad_param_is_refused_before_anything_changes(name, case, position):
    """The bad group also holds a param with state (from an earlier step) and one whose first
    grad arrives with the bad one: neither may change, and no state may be left behind (nor
    any changed: Adagrad's, created by its constructor, included)."""
    make_bad, message = BAD[case]
    bad_params, bad_grads = make_bad()
    gen = generator(1)
    stale, fresh = _leaf(torch.randn(5, generator=gen)), _leaf(torch.randn(3, 3, generator=gen))
    bad_group = [stale, fresh, *bad_params]
    other_group = [_leaf(torch.randn(s, generator=gen)) for s in [(7,), (33, 65)]]
    groups = {
        "only-group": [dict(params=bad_group)],
        "first-of-two": [dict(params=bad_group), dict(params=other_group, lr=0.02)],
        "second-of-two": [dict(params=other_group, lr=0.02), dict(params=bad_group)],
    }[position]
    opt = getattr(fastopt, f"Fused{name}")(groups, **RICH[name])
    good = [stale, *(other_group if position != "only-group" else [])]
    all_params = [*good, fresh, *bad_params]
    # One good step first (params without grads are skipped), so there is state to keep.
    set_grads(gen, good)
    opt.step()
    set_grads(gen, [*good, fresh])
    for p, g in zip(bad_params, bad_grads, strict=True):
        p.grad = g
    before = snapshot(opt, all_params)
    if name != "Adagrad":  # (Adagrad's constructor creates the state of every param)
        assert before["state_keys"] == [True] * len(good) + [False] * (1 + len(bad_params))
    index = 1 if position == "second-of-two" else 0
    where = rf"Fused{name}: param \d of param_groups\[{index}\]"
    with pytest.raises(RuntimeError, match=f"{where}.*{message}"):
        opt.step()
    assert_unchanged(opt, all_params, before)
    # And the optimizer is still usable once the bad params are gone.
    for p in bad_params:
        p.grad = None
    opt.step()
    assert all(opt.state[p]["step"].item() == 2 for p in good)
    assert opt.state[fresh]["step"].item() == 1


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop", "Adadelta"])
def test_sparse_embedding_gradient_is_refused(name):
    """Named by group and param; FusedAdam's error also points to torch.optim.SparseAdam."""
    torch.manual_seed(3)
    embedding = nn.Embedding(11, 4, sparse=True)
    head = nn.Linear(4, 2)
    params = list(embedding.parameters()) + list(head.parameters())
    opt = getattr(fastopt, f"Fused{name}")(params, **RICH[name])
    head(embedding(torch.tensor([1, 5, 5]))).sum().backward()
    assert embedding.weight.grad.is_sparse
    before = snapshot(opt, params)
    hint = ".*SparseAdam" if name.startswith("Adam") else ""
    with pytest.raises(RuntimeError, match=rf"param 0 of param_groups\[0\].*sparse gradient{hint}"):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_error_names_the_param_by_its_index_in_the_group(name):
    """Params without a grad still count: the index is the one in param_groups[i]["params"]."""
    no_grad = _leaf(torch.randn(3))
    first_group = [_leaf(torch.randn(4))]
    bad = _leaf(torch.randn(5, dtype=torch.complex64))
    opt = getattr(fastopt, f"Fused{name}")([{"params": first_group}, {"params": [no_grad, bad]}])
    set_grads(generator(9), first_group + [bad])
    before = snapshot(opt, [*first_group, no_grad, bad])
    with pytest.raises(RuntimeError, match=r"param 1 of param_groups\[1\] \(shape \(5,\)\)"):
        opt.step()
    assert_unchanged(opt, [*first_group, no_grad, bad], before)


# The state tensor that a checkpoint may hold in a wrong shape, and the op's name for its list.
STATE_LISTS = {"Adam": ("exp_avg", "exp_avgs"), "AdamW": ("exp_avg", "exp_avgs"),
               "RMSprop": ("square_avg", "square_avgs"), "Adagrad": ("sum", "state_sums"),
               "Adadelta": ("acc_delta", "acc_deltas")}  # fmt: skip


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bad_state_in_a_later_group_changes_no_group(name):
    """State the Python checks never look at (here a loaded state tensor of the wrong shape) is
    caught by the op's own checks, which run on later groups before any group steps."""
    first, second = [_leaf(torch.randn(4))], [_leaf(torch.randn(6))]
    opt = getattr(fastopt, f"Fused{name}")([{"params": first}, {"params": second}], **RICH[name])
    gen = generator(10)
    set_grads(gen, first + second)
    opt.step()
    key, list_name = STATE_LISTS[name]
    opt.state[second[0]][key] = torch.zeros(5)
    set_grads(gen, first + second)
    before = snapshot(opt, first + second)
    with pytest.raises(RuntimeError, match=rf"{list_name}\[0\] has shape \[5\]"):
        opt.step()
    assert_unchanged(opt, first + second, before)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_lr_tensor_on_another_device_is_refused(name):
    params = [_leaf(torch.randn(7)), _leaf(torch.randn(3, 5))]
    opt = getattr(fastopt, f"Fused{name}")(params, lr=torch.tensor(0.01))
    # Set after construction: torch's own constructor check reads the value, which a meta
    # tensor does not have.
    opt.param_groups[0]["lr"] = torch.tensor(0.01, device="meta")
    set_grads(generator(4), params)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"lr.*meta"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_require_kernels_names_a_device_without_kernels():
    with pytest.raises(RuntimeError, match="not for xpu"):
        _extension.require_kernels(torch.device("xpu"), "x")
    _extension.require_kernels(torch.device("cpu"), "x")  # built: no error
    _extension.require_kernels(torch.device("meta"), "x")  # shapes only: no error


@pytest.mark.skipif(_extension.has_kernels("cuda"), reason="fastopt's CUDA kernels are built here")
def test_require_kernels_names_what_is_missing_for_cuda():
    with pytest.raises(RuntimeError, match="no fastopt kernels for cuda tensors.*Rebuild"):
        _extension.require_kernels(torch.device("cuda"), "x")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_on_a_device_without_kernels(monkeypatch, name):
    """The CPU kernels made to look unbuilt: a clear error, and nothing changed (by the
    optimizer, nor for Adam by fastopt.functional.adam_step_)."""
    params, _ = make_param_pairs([(7,), (33, 65)], seed=5)
    opt = getattr(fastopt, f"Fused{name}")(params, **RICH[name])
    gen = generator(6)
    set_grads(gen, params)
    opt.step()
    set_grads(gen, params)
    before = snapshot(opt, params)
    monkeypatch.delitem(_extension._loaded, "cpu")
    monkeypatch.setitem(_extension._load_errors, "cpu", "simulated: built without CPU kernels")
    with pytest.raises(RuntimeError, match=f"Fused{name}: no fastopt kernels for cpu tensors"):
        opt.step()
    assert_unchanged(opt, params, before)
    if name != "Adam":
        return
    state = opt.state[params[0]]
    with pytest.raises(RuntimeError, match="no fastopt kernels for cpu tensors"):
        fastopt.functional.adam_step_(
            params[:1],
            [params[0].grad],
            [state["exp_avg"]],
            [state["exp_avg_sq"]],
            [],
            [state["step"]],
            lr=0.01,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
        )
    assert_unchanged(opt, params, before)


def test_functional_sparse_adagrad_step_without_kernels(monkeypatch):
    param = torch.randn(10, 3)
    grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 4, 1]]), torch.randn(3, 3), (10, 3), check_invariants=True
    )
    state_sum, step = torch.zeros(10, 3), torch.tensor(0.0)
    copies = [t.clone() for t in (param, grad, state_sum, step)]
    monkeypatch.delitem(_extension._loaded, "cpu")
    monkeypatch.setitem(_extension._load_errors, "cpu", "simulated: built without CPU kernels")
    with pytest.raises(RuntimeError, match="no fastopt kernels for cpu tensors"):
        fastopt.functional.sparse_adagrad_step_(param, grad, state_sum, step, lr=0.1)
    for t, c in zip((param, grad, state_sum, step), copies, strict=True):
        assert torch.equal(t.to_dense(), c.to_dense())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_differentiable_is_refused(name):
    with pytest.raises(ValueError, match="differentiable"):
        getattr(fastopt, f"Fused{name}")([_leaf(torch.randn(3))], differentiable=True)


ADAM_BAD_HYPERPARAMETERS = [
    dict(lr=-1e-3),
    dict(lr=math.nan),
    dict(lr=torch.tensor(-1e-3)),
    dict(lr=torch.tensor([0.1, 0.2])),
    dict(eps=-1e-8),
    dict(eps=math.nan),
    dict(betas=(1.0, 0.999)),
    dict(betas=(-0.1, 0.999)),
    dict(betas=(0.9, 1.0)),
    dict(betas=(0.9, math.nan)),
    dict(betas=(0.9, torch.tensor(0.999))),
    dict(weight_decay=-0.1),
    dict(weight_decay=math.nan),
]

# Every check of torch's constructors, with a value that fails it.
BAD_HYPERPARAMETERS = {
    "Adam": ADAM_BAD_HYPERPARAMETERS,
    "AdamW": ADAM_BAD_HYPERPARAMETERS,
    "RMSprop": [
        dict(lr=-1e-3), dict(lr=math.nan), dict(lr=torch.tensor(-1e-3)),
        dict(lr=torch.tensor([0.1, 0.2])), dict(eps=-1e-8), dict(eps=math.nan),
        dict(momentum=-0.1), dict(momentum=math.nan), dict(weight_decay=-0.1),
        dict(weight_decay=math.nan), dict(alpha=-0.1), dict(alpha=math.nan),
    ],
    "Adagrad": [
        dict(lr=-1e-3), dict(lr=math.nan), dict(lr=torch.tensor(-1e-3)),
        dict(lr=torch.tensor([0.1, 0.2])), dict(lr_decay=-0.1), dict(lr_decay=math.nan),
        dict(weight_decay=-0.1), dict(initial_accumulator_value=-0.1),
        dict(initial_accumulator_value=math.nan), dict(eps=-1e-10), dict(eps=math.nan),
    ],
    "Adadelta": [
        dict(lr=-1e-3), dict(lr=math.nan), dict(lr=torch.tensor(-1e-3)),
        dict(lr=torch.tensor([0.1, 0.2])), dict(rho=-0.1), dict(rho=1.1), dict(rho=math.nan),
        dict(eps=-1e-6), dict(eps=math.nan), dict(weight_decay=-0.1),
        dict(weight_decay=math.nan),
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [(name, kwargs) for name in OPTIMIZERS for kwargs in BAD_HYPERPARAMETERS[name]],
    ids=lambda v: v if isinstance(v, str) else repr(v),
)
def test_bad_hyperparameters_raise_like_torch(name, kwargs):
    with pytest.raises(ValueError) as torch_error:
        getattr(torch.optim, name)([_leaf(torch.randn(3))], **kwargs)
    expected = str(torch_error.value).split(":")[0]  # the message without the value
    with pytest.raises(ValueError, match=re.escape(expected)):
        getattr(fastopt, f"Fused{name}")([_leaf(torch.randn(3))], **kwargs)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("RMSprop", dict(alpha=0.0, momentum=0.0, eps=0.0, weight_decay=0.0, lr=0.0)),
        ("Adagrad", dict(lr_decay=0.0, initial_accumulator_value=0.0, eps=0.0, lr=0.0)),
        ("Adadelta", dict(rho=0.0, eps=0.0, lr=0.0)),
        ("Adadelta", dict(rho=1.0)),
    ],
    ids=repr,
)
def test_boundary_hyperparameters_are_accepted_like_torch(name, kwargs):
    getattr(torch.optim, name)([_leaf(torch.randn(3))], **kwargs)
    getattr(fastopt, f"Fused{name}")([_leaf(torch.randn(3))], **kwargs)


# -- dense layouts that must work ------------------------------------------------------------

LAYOUTS = {
    "transposed": ([(9, 5)], lambda t: t.t()),
    "channels_last": ([(4, 3, 5, 7)], lambda t: t.to(memory_format=torch.channels_last)),
    "channels_last-1x1": ([(8, 6, 1, 1)], lambda t: t.to(memory_format=torch.channels_last)),
    "permuted-3d": ([(3, 4, 5)], lambda t: t.permute(2, 0, 1)),
}

LAYOUT_CONFIGS = [
    ("AdamW", dict(lr=0.01, amsgrad=False)),
    ("AdamW", dict(lr=0.01, amsgrad=True)),
    *((name, RICH[name]) for name in ["RMSprop", "Adagrad", "Adadelta"]),
]


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    ("name", "kwargs"), LAYOUT_CONFIGS, ids=lambda v: v if isinstance(v, str) else repr(v)
)
def test_dense_non_contiguous_params_match_torch(layout, name, kwargs):
    """Params, state and grads keep the param's layout; the values match torch's."""
    shapes, to_layout = LAYOUTS[layout]
    ref_params, fast_params = make_param_pairs(shapes, seed=7, layout=to_layout)
    if layout != "channels_last-1x1":
        assert not fast_params[0].is_contiguous()
    ref, fast = optimizer_pair(name, ref_params, fast_params, **kwargs)
    gen = generator(8)
    for step in range(4):
        set_grads(gen, ref_params, fast_params)
        assert fast_params[0].grad.stride() == fast_params[0].stride()
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    for key, value in fast.state[fast_params[0]].items():
        if key != "step":
            assert value.stride() == fast_params[0].stride(), key


def test_dense_non_contiguous_params_through_autograd():
    """The grads autograd produces for a transposed and a channels_last param."""
    torch.manual_seed(9)
    conv = nn.Conv2d(3, 5, 3).to(memory_format=torch.channels_last)
    weight_t = nn.Parameter(torch.randn(7, 5).t())  # (5, 7), strides (1, 5)
    models = [(conv, weight_t), None]
    ref_conv = nn.Conv2d(3, 5, 3).to(memory_format=torch.channels_last)
    ref_conv.load_state_dict(conv.state_dict())
    ref_weight_t = nn.Parameter(weight_t.detach().clone(memory_format=torch.preserve_format))
    models[1] = (ref_conv, ref_weight_t)
    fast = fastopt.FusedAdam([*conv.parameters(), weight_t], lr=0.01)
    ref = torch.optim.Adam([*ref_conv.parameters(), ref_weight_t], lr=0.01, foreach=False)
    gen = generator(10)
    for step in range(3):
        x = torch.randn(2, 3, 9, 9, generator=gen).to(memory_format=torch.channels_last)
        for (c, w), opt in zip(models, (fast, ref), strict=True):
            opt.zero_grad()
            (c(x).mean(dim=(2, 3)) @ w).square().sum().backward()
        assert conv.weight.grad.stride() == conv.weight.stride()
        fast.step()
        ref.step()
        assert_matches_reference(
            ref,
            fast,
            [*ref_conv.parameters(), ref_weight_t],
            [*conv.parameters(), weight_t],
            **FP32,
            where=f"{step}",
        )


def test_grad_strides_may_differ_in_size_one_dims():
    """Autograd may hand a (1, n) param a grad with another stride in the size-1 dim (its layout
    contract ignores such dims, e.g. the grad of a transpose); the memory is laid out the same,
    and torch.optim.Adam takes it."""
    ref_params, fast_params = make_param_pairs([(1, 5)], seed=11)
    w = torch.randn(5, 1, generator=generator(12))
    for p in (*ref_params, *fast_params):
        (p.t() * w).sum().backward()
    assert fast_params[0].stride() == (5, 1) and fast_params[0].grad.stride() == (1, 1)
    ref, fast = optimizer_pair("Adam", ref_params, fast_params, lr=0.01)
    ref.step()
    fast.step()
    assert_matches_reference(ref, fast, ref_params, fast_params, **FP32)


def test_grad_scaler_tensors_follow_each_group_to_its_device():
    from fastopt.optim._base import _AmpTensors

    amp = _AmpTensors(torch.tensor(1024.0), torch.tensor(0.0))
    meta = torch.device("meta")
    assert amp.grad_scale(meta).device == meta and amp.found_inf(meta).device == meta
    assert amp.grad_scale(meta) is amp.grad_scale(meta)  # one copy per device and step
    assert amp.found_inf(torch.device("cpu")) is amp._found_inf
    assert _AmpTensors(None, None).grad_scale(meta) is None
