"""state_dict compatibility with torch.optim.Adam / AdamW, and the bookkeeping FusedAdam inherits
from torch.optim.Optimizer: param groups, add_param_group, zero_grad, params without grads."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import (
    FP32,
    SHAPES,
    assert_matches_reference,
    assert_state_format,
    generator,
    make_param_pairs,
    optimizer_pair,
    set_grads,
    state_keys,
    step_and_compare,
)

import fastopt


def _one_step_state_dicts(name, **kwargs):
    ref_params, fast_params = make_param_pairs(SHAPES, seed=1)
    ref = getattr(torch.optim, name)(ref_params, **kwargs)
    fast = getattr(fastopt, f"Fused{name}")(fast_params, **kwargs)
    set_grads(generator(2), ref_params, fast_params)
    ref.step()
    fast.step()
    return ref.state_dict(), fast.state_dict()


def _assert_same_value(a, b, what):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), what
        assert (a.dtype, a.shape, a.device) == (b.dtype, b.shape, b.device), what
        assert torch.equal(a, b), what
    else:
        assert type(a) is type(b) and a == b, what


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
        dict(lr=torch.tensor(0.01), amsgrad=True),
    ],
    ids=["defaults", "options", "tensor-lr"],
)
def test_state_dict_format_is_torchs(name, kwargs):
    ref_sd, fast_sd = _one_step_state_dicts(name, **kwargs)
    assert fast_sd.keys() == ref_sd.keys()
    assert len(fast_sd["param_groups"]) == len(ref_sd["param_groups"])
    for ref_group, fast_group in zip(ref_sd["param_groups"], fast_sd["param_groups"], strict=True):
        assert list(fast_group) == list(ref_group)  # the same keys, in the same order
        for key in ref_group:
            _assert_same_value(ref_group[key], fast_group[key], f"param_groups[0][{key!r}]")
    assert fast_sd["state"].keys() == ref_sd["state"].keys()
    for index, ref_state in ref_sd["state"].items():
        fast_state = fast_sd["state"][index]
        assert list(fast_state) == list(ref_state), index
        for key, ref_value in ref_state.items():
            value = fast_state[key]
            assert isinstance(value, torch.Tensor), (index, key)
            assert (value.dtype, value.shape, value.device) == (
                ref_value.dtype,
                ref_value.shape,
                ref_value.device,
            ), (index, key)
        assert fast_state["step"].dim() == 0 and fast_state["step"].dtype == torch.float32
        assert fast_state["step"].item() == ref_state["step"].item() == 1.0


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_foreach_and_fused_arguments_keep_the_state_dict_keys(name):
    for kwargs in (dict(foreach=False), dict(foreach=True), dict(fused=True)):
        ref_sd, fast_sd = _one_step_state_dicts(name, **kwargs)
        assert list(fast_sd["param_groups"][0]) == list(ref_sd["param_groups"][0]), kwargs


def _through_bytes(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("via_bytes", [False, True], ids=["in-memory", "torch.save"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_checkpoint_round_trip_continues_torchs_trajectory(
    device, name, direction, via_bytes, amsgrad
):
    """N steps with one optimizer, its state_dict loaded into the other, M more steps: the same
    as an uninterrupted torch run, after every step. On CUDA torch keeps `step` on the CPU
    (capturable=False) and fastopt on the GPU: each must load the other's."""
    kwargs = dict(lr=0.01, weight_decay=0.1, amsgrad=amsgrad, betas=(0.85, 0.995))
    torch_cls = getattr(torch.optim, name)
    fast_cls = getattr(fastopt, f"Fused{name}")
    first_cls, second_cls = (
        (torch_cls, fast_cls) if direction == "torch->fastopt" else (fast_cls, torch_cls)
    )
    extra = lambda cls: dict(foreach=False) if cls is torch_cls else {}  # noqa: E731
    uninterrupted, params = make_param_pairs(SHAPES, device=device, seed=3)
    reference = torch_cls(uninterrupted, foreach=False, **kwargs)
    first = first_cls(params, **kwargs, **extra(first_cls))
    gen = generator(4)
    step_and_compare(reference, first, uninterrupted, params, gen, 4)

    state_dict = first.state_dict()
    if via_bytes:
        state_dict = _through_bytes(state_dict)
    # A fresh optimizer with other hyperparameters: the checkpoint's must win.
    second = second_cls(params, lr=0.5, betas=(0.5, 0.5), **extra(second_cls))
    second.load_state_dict(state_dict)
    del first
    assert second.param_groups[0]["betas"] == (0.85, 0.995)
    for p in params:
        assert second.state[p]["step"].item() == 4.0
    step_and_compare(reference, second, uninterrupted, params, gen, 4, first=4)
    if second_cls is fast_cls:
        for p in params:
            assert_state_format(second, p, state_keys(name, kwargs))
            assert second.state[p]["step"].device == p.device


def test_tensor_lr_survives_the_round_trip():
    ref_params, fast_params = make_param_pairs([(7,), (33, 65)], seed=5)
    ref, fast = optimizer_pair("Adam", ref_params, fast_params, lr=torch.tensor(0.02))
    gen = generator(6)
    set_grads(gen, ref_params, fast_params)
    ref.step()
    fast.step()
    loaded = fastopt.FusedAdam(fast_params, lr=torch.tensor(0.5))
    loaded.load_state_dict(_through_bytes(fast.state_dict()))
    lr = loaded.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(0.02)
    step_and_compare(ref, loaded, ref_params, fast_params, gen, 3, first=1)


def test_old_checkpoint_with_python_number_steps():
    """Checkpoints of old torch versions hold `step` as a Python number."""
    ref_params, fast_params = make_param_pairs([(7,), (4097,)], seed=7)
    writer = torch.optim.Adam([p.detach().clone().requires_grad_() for p in ref_params])
    for p in writer.param_groups[0]["params"]:
        p.grad = torch.randn(p.shape, generator=generator(8))
    writer.step()
    old = writer.state_dict()
    for state in old["state"].values():
        state["step"] = int(state["step"].item())
    ref = torch.optim.Adam(ref_params, foreach=False)
    fast = fastopt.FusedAdam(fast_params)
    # Each gets its own copy: load_state_dict keeps tensors that need no cast, so two optimizers
    # loading one dict would share (and both update) its state tensors.
    ref.load_state_dict(copy.deepcopy(old))
    fast.load_state_dict(copy.deepcopy(old))
    for p in fast_params:
        step = fast.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.item() == 1
    step_and_compare(ref, fast, ref_params, fast_params, generator(9), 3)


def test_checkpoint_of_a_contiguous_model_loads_into_its_channels_last_copy():
    """A checkpoint's state is contiguous; the same model converted to channels_last afterwards
    (a common inference/training switch) continues under torch.optim.Adam, and must under
    FusedAdam too."""
    gen = generator(10)
    weight = torch.randn(8, 3, 5, 5, generator=gen).requires_grad_()
    writer = torch.optim.Adam([weight], lr=0.01, foreach=False)
    weight.grad = torch.randn(weight.shape, generator=gen)
    writer.step()
    checkpoint = _through_bytes(writer.state_dict())
    ref_params, fast_params = make_param_pairs(
        [(8, 3, 5, 5)], seed=11, layout=lambda t: t.to(memory_format=torch.channels_last)
    )
    ref = torch.optim.Adam(ref_params, foreach=False)
    fast = fastopt.FusedAdam(fast_params)
    ref.load_state_dict(copy.deepcopy(checkpoint))
    fast.load_state_dict(copy.deepcopy(checkpoint))
    step_and_compare(ref, fast, ref_params, fast_params, gen, 3)


def test_add_param_group_midway():
    ref_a, fast_a = make_param_pairs([(7,), (33, 65)], seed=12)
    ref_b, fast_b = make_param_pairs([(1,), (4097,), (0,)], seed=13)
    ref, fast = optimizer_pair("Adam", ref_a, fast_a, lr=0.01)
    gen = generator(14)
    step_and_compare(ref, fast, ref_a, fast_a, gen, 3)
    group = dict(lr=0.05, betas=(0.7, 0.9), weight_decay=0.2, amsgrad=True)
    ref.add_param_group(dict(params=ref_b, **group))
    fast.add_param_group(dict(params=fast_b, **group))
    assert fast.param_groups[1].keys() == ref.param_groups[1].keys()
    step_and_compare(ref, fast, ref_a + ref_b, fast_a + fast_b, gen, 3, first=3)
    assert fast.state[fast_b[1]]["step"].item() == 3 and fast.state[fast_a[0]]["step"].item() == 6


def test_param_groups_with_different_hyperparameters():
    shapes = [(7,), (4097,), (33, 65), (1,), (0,), (5, 3)]
    ref_params, fast_params = make_param_pairs(shapes, seed=15)
    groups = [
        dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.0),
        dict(lr=torch.tensor(0.003), betas=(0.8, 0.99), eps=1e-5, weight_decay=0.3, amsgrad=True),
        dict(lr=0.02, maximize=True, decoupled_weight_decay=True, weight_decay=0.1),
    ]

    def param_groups(params):
        return [
            dict(
                params=params[2 * i : 2 * i + 2],
                **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in g.items()},
            )
            for i, g in enumerate(groups)
        ]

    ref = torch.optim.Adam(param_groups(ref_params), foreach=False)
    fast = fastopt.FusedAdam(param_groups(fast_params))
    step_and_compare(ref, fast, ref_params, fast_params, generator(16), 6)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    ref_params, fast_params = make_param_pairs([(7,), (33, 65)], seed=17)
    ref, fast = optimizer_pair("Adam", ref_params, fast_params, lr=0.01)
    gen = generator(18)
    for step in range(4):
        if step % 2 == 0:
            set_grads(gen, ref_params, fast_params)
        else:
            ref.zero_grad(set_to_none=set_to_none)
            fast.zero_grad(set_to_none=set_to_none)
            for p in fast_params:
                assert p.grad is None if set_to_none else torch.count_nonzero(p.grad) == 0
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    expected_steps = 2.0 if set_to_none else 4.0
    assert all(fast.state[p]["step"].item() == expected_steps for p in fast_params)


def test_params_without_grad_are_skipped():
    ref_params, fast_params = make_param_pairs([(7,), (4097,), (33, 65), (1,)], seed=19)
    ref, fast = optimizer_pair("AdamW", ref_params, fast_params, lr=0.01, amsgrad=True)
    frozen_before = [p.detach().clone() for p in fast_params[1::2]]
    gen = generator(20)
    for step in range(3):
        set_grads(gen, ref_params[::2], fast_params[::2])
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    for p, before in zip(fast_params[1::2], frozen_before, strict=True):
        assert p not in fast.state  # no state created for a param that never had a grad
        assert torch.equal(p.detach(), before)
    # They join later: their own step count starts at 1.
    step_and_compare(ref, fast, ref_params, fast_params, gen, 2, first=3)
    assert fast.state[fast_params[1]]["step"].item() == 2
    assert fast.state[fast_params[0]]["step"].item() == 5


def test_a_model_of_1200_small_params():
    """Many small tensors of assorted sizes in one group, against torch, flattened per step."""
    gen = generator(21)
    sizes = torch.randint(0, 300, (1200,), generator=gen).tolist()
    shapes = [(s,) if i % 3 else (max(1, s // 7), 7) for i, s in enumerate(sizes)]
    ref_params, fast_params = make_param_pairs(shapes, seed=22)
    ref, fast = optimizer_pair(
        "AdamW", ref_params, fast_params, lr=0.01, weight_decay=0.1, amsgrad=True
    )
    for step in range(4):
        step_and_compare(ref, fast, ref_params, fast_params, gen, 1, first=step, flat=True)
        steps = torch.stack([fast.state[p]["step"] for p in fast_params])
        assert torch.all(steps == step + 1)
