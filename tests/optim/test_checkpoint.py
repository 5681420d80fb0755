"""Every fused optimizer with what surrounds a step: torch's state_dict format, checkpoints both
ways with continued trajectories (torch.save, Tensor lr, old Python-number steps), and the
bookkeeping inherited from torch.optim.Optimizer: param groups, add_param_group, zero_grad, params
without grads."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers.optim_cases import OPTIMIZERS, RICH, SHAPES
from helpers.optim_compare import (
    assert_matches_reference,
    assert_state_format,
    state_keys,
    step_and_compare,
)
from helpers.optim_pairs import make_param_pairs, optimizer_pair, set_grads
from helpers.rng import generator
from helpers.tolerances import FP32

import fastopt

# Per optimizer, argument sets for the format tests: the defaults, every option on, Tensor lr.
ADAM_FORMAT_KWARGS = [
    dict(),
    dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, amsgrad=True, maximize=True),
    dict(lr=torch.tensor(0.01), amsgrad=True),
]
FORMAT_KWARGS = {
    "Adam": ADAM_FORMAT_KWARGS,
    "AdamW": ADAM_FORMAT_KWARGS,
    "RMSprop": [
        dict(),
        dict(lr=0.02, alpha=0.9, eps=1e-6, weight_decay=0.1, momentum=0.5, centered=True,
             maximize=True),
        dict(lr=torch.tensor(0.01), momentum=0.3),
        dict(centered=True),
    ],
    "Adagrad": [
        dict(),
        dict(lr=0.02, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.3, eps=1e-6,
             maximize=True),
        dict(lr=torch.tensor(0.01)),
    ],
    "Adadelta": [
        dict(),
        dict(lr=0.5, rho=0.8, eps=1e-5, weight_decay=0.1, maximize=True),
        dict(lr=torch.tensor(0.5)),
    ],
}  # fmt: skip

FORMAT_CASES = [
    pytest.param(name, kwargs, id=f"{name}-{i}")
    for name in OPTIMIZERS
    for i, kwargs in enumerate(FORMAT_KWARGS[name])
]


def _state_dicts(name, steps, **kwargs):
    """The state_dicts of torch.optim.`name` (default foreach) and fastopt.Fused`name` after
    `steps` steps on the same params and grads."""
    ref_params, fast_params = make_param_pairs(SHAPES, seed=1)
    ref = getattr(torch.optim, name)(ref_params, **kwargs)
    fast = getattr(fastopt, f"Fused{name}")(fast_params, **kwargs)
    gen = generator(2)
    for _ in range(steps):
        set_grads(gen, ref_params, fast_params)
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


def _assert_same_format(ref_sd, fast_sd, steps):
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
            assert (value.dtype, value.shape, value.device, value.layout) == (
                ref_value.dtype,
                ref_value.shape,
                ref_value.device,
                ref_value.layout,
            ), (index, key)
        assert fast_state["step"].dim() == 0 and fast_state["step"].dtype == torch.float32
        assert fast_state["step"].item() == ref_state["step"].item() == steps


@pytest.mark.parametrize(("name", "kwargs"), FORMAT_CASES)
def test_state_dict_format_is_torchs(name, kwargs):
    _assert_same_format(*_state_dicts(name, 1, **kwargs), steps=1)


@pytest.mark.parametrize("initial_accumulator_value", [0.0, 0.25])
def test_adagrad_state_exists_from_construction_as_in_torch(initial_accumulator_value):
    """torch.optim.Adagrad creates every param's state in its constructor: step 0, sum filled
    with initial_accumulator_value; the state_dict before any step is torch's."""
    kwargs = dict(initial_accumulator_value=initial_accumulator_value)
    ref_sd, fast_sd = _state_dicts("Adagrad", 0, **kwargs)
    _assert_same_format(ref_sd, fast_sd, steps=0)
    for index, state in fast_sd["state"].items():
        assert torch.equal(state["sum"], ref_sd["state"][index]["sum"]), index


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_foreach_and_fused_arguments_keep_the_state_dict_keys(name):
    has_fused = name in ("Adam", "AdamW", "Adagrad")
    flags = [dict(foreach=False), dict(foreach=True)] + ([dict(fused=True)] if has_fused else [])
    for kwargs in flags:
        ref_sd, fast_sd = _state_dicts(name, 1, **kwargs)
        assert list(fast_sd["param_groups"][0]) == list(ref_sd["param_groups"][0]), kwargs
    # Recorded as torch records them by default, whatever was passed.
    fast_group = _state_dicts(name, 1, foreach=True)[1]["param_groups"][0]
    assert fast_group["foreach"] is None
    assert fast_group["differentiable"] is False
    if has_fused:
        assert _state_dicts(name, 1, fused=True)[1]["param_groups"][0]["fused"] is None


def _through_bytes(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


ADAM_ROUND_TRIP = dict(lr=0.01, weight_decay=0.1, betas=(0.85, 0.995))
ROUND_TRIP_CASES = [
    *(
        pytest.param(name, dict(ADAM_ROUND_TRIP, amsgrad=amsgrad), id=f"{name}-ams{int(amsgrad)}")
        for name in ("Adam", "AdamW")
        for amsgrad in (False, True)
    ),
    *(pytest.param(name, RICH[name], id=name) for name in ("RMSprop", "Adagrad", "Adadelta")),
]

# Arguments a fresh optimizer gets before loading a checkpoint: the checkpoint's must win.
OTHER_KWARGS = {
    "Adam": dict(lr=0.5, betas=(0.5, 0.5)),
    "AdamW": dict(lr=0.5, betas=(0.5, 0.5)),
    "RMSprop": dict(lr=0.5, alpha=0.5, momentum=0.9, centered=True),
    "Adagrad": dict(lr=0.5, lr_decay=0.9),
    "Adadelta": dict(lr=0.1, rho=0.5),
}


@pytest.mark.parametrize(("name", "kwargs"), ROUND_TRIP_CASES)
@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("via_bytes", [False, True], ids=["in-memory", "torch.save"])
def test_checkpoint_round_trip_continues_torchs_trajectory(
    device, name, kwargs, direction, via_bytes
):
    """N steps with one optimizer, its state_dict loaded into the other, M more steps: the same
    as an uninterrupted torch run, after every step. On CUDA torch keeps `step` on the CPU
    and fastopt on the GPU: each must load the other's."""
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
    second = second_cls(params, **OTHER_KWARGS[name], **extra(second_cls))
    second.load_state_dict(state_dict)
    del first
    for key, value in kwargs.items():
        assert second.param_groups[0][key] == value, key
    for p in params:
        assert second.state[p]["step"].item() == 4.0
    step_and_compare(reference, second, uninterrupted, params, gen, 4, first=4)
    if second_cls is fast_cls:
        for p in params:
            assert_state_format(second, p, state_keys(name, kwargs))
            assert second.state[p]["step"].device == p.device


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_tensor_lr_survives_the_round_trip(name):
    ref_params, fast_params = make_param_pairs([(7,), (33, 65)], seed=5)
    kwargs = {**RICH[name], "lr": torch.tensor(0.02)}
    ref, fast = optimizer_pair(name, ref_params, fast_params, **kwargs)
    gen = generator(6)
    set_grads(gen, ref_params, fast_params)
    ref.step()
    fast.step()
    loaded = getattr(fastopt, f"Fused{name}")(fast_params, lr=torch.tensor(0.5))
    loaded.load_state_dict(_through_bytes(fast.state_dict()))
    lr = loaded.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.item() == pytest.approx(0.02)
    step_and_compare(ref, loaded, ref_params, fast_params, gen, 3, first=1)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_old_checkpoint_with_python_number_steps(name):
    """Checkpoints of old torch versions hold `step` as a Python number."""
    ref_params, fast_params = make_param_pairs([(7,), (4097,)], seed=7)
    writer_params = [p.detach().clone().requires_grad_() for p in ref_params]
    writer = getattr(torch.optim, name)(writer_params, **RICH[name])
    for p in writer_params:
        p.grad = torch.randn(p.shape, generator=generator(8))
    writer.step()
    old = writer.state_dict()
    for state in old["state"].values():
        state["step"] = int(state["step"].item())
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **RICH[name])
    fast = getattr(fastopt, f"Fused{name}")(fast_params, **RICH[name])
    # Each gets its own copy: load_state_dict keeps tensors that need no cast.
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


# -- param groups ------------------------------------------------------------------------------

GROUP_SETTINGS = {
    "Adam": [
        dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.0),
        dict(lr=torch.tensor(0.003), betas=(0.8, 0.99), eps=1e-5, weight_decay=0.3, amsgrad=True),
        dict(lr=0.02, maximize=True, decoupled_weight_decay=True, weight_decay=0.1),
    ],
    "AdamW": [
        dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.0),
        dict(lr=torch.tensor(0.003), betas=(0.8, 0.99), eps=1e-5, weight_decay=0.3, amsgrad=True),
        dict(lr=0.02, maximize=True, weight_decay=0.1),
    ],
    "RMSprop": [
        dict(lr=0.01),
        dict(lr=torch.tensor(0.003), alpha=0.9, eps=1e-5, weight_decay=0.3, momentum=0.2),
        dict(lr=0.02, maximize=True, centered=True),
    ],
    "Adagrad": [
        dict(lr=0.01),
        dict(lr=torch.tensor(0.03), lr_decay=0.2, eps=1e-5, weight_decay=0.3),
        dict(lr=0.02, maximize=True),
    ],
    "Adadelta": [
        dict(lr=1.0),
        dict(lr=torch.tensor(0.3), rho=0.8, eps=1e-5, weight_decay=0.3),
        dict(lr=0.5, maximize=True),
    ],
}


def _groups(settings, params):
    return [
        dict(
            params=params[2 * i : 2 * i + 2],
            **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()},
        )
        for i, s in enumerate(settings)
    ]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_param_groups_with_different_hyperparameters(name):
    shapes = [(7,), (4097,), (33, 65), (1,), (0,), (5, 3)]
    ref_params, fast_params = make_param_pairs(shapes, seed=15)
    settings = GROUP_SETTINGS[name]
    ref = getattr(torch.optim, name)(_groups(settings, ref_params), foreach=False)
    fast = getattr(fastopt, f"Fused{name}")(_groups(settings, fast_params))
    step_and_compare(ref, fast, ref_params, fast_params, generator(16), 6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_add_param_group_midway(name):
    ref_a, fast_a = make_param_pairs([(7,), (33, 65)], seed=12)
    ref_b, fast_b = make_param_pairs([(1,), (4097,), (0,)], seed=13)
    ref, fast = optimizer_pair(name, ref_a, fast_a, **RICH[name])
    gen = generator(14)
    step_and_compare(ref, fast, ref_a, fast_a, gen, 3)
    group = {k: v for k, v in GROUP_SETTINGS[name][1].items() if k != "lr"}
    ref.add_param_group(dict(params=ref_b, lr=0.05, **group))
    fast.add_param_group(dict(params=fast_b, lr=0.05, **group))
    assert list(fast.param_groups[1]) == list(ref.param_groups[1])
    step_and_compare(ref, fast, ref_a + ref_b, fast_a + fast_b, gen, 3, first=3)
    assert fast.state[fast_b[1]]["step"].item() == 3 and fast.state[fast_a[0]]["step"].item() == 6


def test_adagrad_initial_accumulator_value_is_the_constructors():
    """torch.optim.Adagrad fills every sum with the constructor's initial_accumulator_value,
    also for groups that name their own and for groups added later (it reads
    self.defaults): a drop-in must follow the same trajectory."""
    ref_a, fast_a = make_param_pairs([(7,), (33, 65)], seed=17)
    ref_b, fast_b = make_param_pairs([(4097,)], seed=18)

    def make(cls, params, **extra):
        groups = [dict(params=params[:1]), dict(params=params[1:], initial_accumulator_value=2.0)]
        return cls(groups, lr=0.1, initial_accumulator_value=0.5, **extra)

    ref = make(torch.optim.Adagrad, ref_a, foreach=False)
    fast = make(fastopt.FusedAdagrad, fast_a)
    assert torch.all(fast.state[fast_a[1]]["sum"] == 0.5)
    gen = generator(19)
    step_and_compare(ref, fast, ref_a, fast_a, gen, 2)
    ref.add_param_group(dict(params=ref_b, initial_accumulator_value=3.0))
    fast.add_param_group(dict(params=fast_b, initial_accumulator_value=3.0))
    step_and_compare(ref, fast, ref_a + ref_b, fast_a + fast_b, gen, 2, first=2)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(name, set_to_none):
    ref_params, fast_params = make_param_pairs([(7,), (33, 65)], seed=17)
    ref, fast = optimizer_pair(name, ref_params, fast_params, **RICH[name])
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


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_params_without_grad_are_skipped(name):
    """No state is created for them (Adagrad's, created by the constructor, stays as it is);
    they join later with their own step count."""
    ref_params, fast_params = make_param_pairs([(7,), (4097,), (33, 65), (1,)], seed=19)
    ref, fast = optimizer_pair(name, ref_params, fast_params, **RICH[name])
    frozen_before = [p.detach().clone() for p in fast_params[1::2]]
    gen = generator(20)
    for step in range(3):
        set_grads(gen, ref_params[::2], fast_params[::2])
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    for p, before in zip(fast_params[1::2], frozen_before, strict=True):
        assert torch.equal(p.detach(), before)
        if name == "Adagrad":
            assert fast.state[p]["step"].item() == 0
        else:
            assert p not in fast.state
    step_and_compare(ref, fast, ref_params, fast_params, gen, 2, first=3)
    assert fast.state[fast_params[1]]["step"].item() == 2
    assert fast.state[fast_params[0]]["step"].item() == 5
