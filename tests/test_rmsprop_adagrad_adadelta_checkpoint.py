"""FusedRMSprop / FusedAdagrad / FusedAdadelta with what surrounds a step: torch's state_dict
format, checkpoints both ways with continued trajectories, param groups, LR schedulers (with a
Tensor lr), and torch.amp.GradScaler (an inf / NaN step changes nothing); and the functional
ops' grad_scale / found_inf.
"""

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
    assert_unchanged,
    generator,
    make_param_pairs,
    optimizer_pair,
    set_grads,
    snapshot,
    state_keys,
    step_and_compare,
)
from torch import nn

import fastopt

NAMES = ["RMSprop", "Adagrad", "Adadelta"]

# Per optimizer, argument sets for the format tests: the defaults, every option on, Tensor lr.
FORMAT_KWARGS = {
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
    for name in NAMES
    for i, kwargs in enumerate(FORMAT_KWARGS[name])
]

# One argument set per optimizer with every optional state tensor and path.
RICH = {
    "RMSprop": dict(lr=0.01, alpha=0.9, weight_decay=0.1, momentum=0.5, centered=True),
    "Adagrad": dict(lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.2),
    "Adadelta": dict(lr=0.5, rho=0.8, weight_decay=0.1),
}


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


@pytest.mark.parametrize("name", NAMES)
def test_foreach_and_fused_arguments_keep_the_state_dict_keys(name):
    flags = [dict(foreach=False), dict(foreach=True)] + (
        [dict(fused=True)] if name == "Adagrad" else []
    )
    for kwargs in flags:
        ref_sd, fast_sd = _state_dicts(name, 1, **kwargs)
        assert list(fast_sd["param_groups"][0]) == list(ref_sd["param_groups"][0]), kwargs
    # Recorded as torch records them by default, whatever was passed.
    fast_group = _state_dicts(name, 1, foreach=True)[1]["param_groups"][0]
    assert fast_group["foreach"] is None
    assert fast_group["differentiable"] is False
    if name == "Adagrad":
        assert _state_dicts(name, 1, fused=True)[1]["param_groups"][0]["fused"] is None


def _through_bytes(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


# Arguments a fresh optimizer gets before loading a checkpoint: the checkpoint's must win.
OTHER_KWARGS = {
    "RMSprop": dict(lr=0.5, alpha=0.5, momentum=0.9, centered=True),
    "Adagrad": dict(lr=0.5, lr_decay=0.9),
    "Adadelta": dict(lr=0.1, rho=0.5),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
@pytest.mark.parametrize("via_bytes", [False, True], ids=["in-memory", "torch.save"])
def test_checkpoint_round_trip_continues_torchs_trajectory(device, name, direction, via_bytes):
    """N steps with one optimizer, its state_dict loaded into the other, M more steps: the same
    as an uninterrupted torch run, after every step. On CUDA torch keeps `step` on the CPU
    and fastopt on the GPU: each must load the other's."""
    kwargs = RICH[name]
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


@pytest.mark.parametrize("name", NAMES)
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


@pytest.mark.parametrize("name", NAMES)
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


# -- param groups ------------------------------------------------------------------------------

GROUP_SETTINGS = {
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


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_with_different_hyperparameters(name):
    shapes = [(7,), (4097,), (33, 65), (1,), (0,), (5, 3)]
    ref_params, fast_params = make_param_pairs(shapes, seed=15)
    settings = GROUP_SETTINGS[name]
    ref = getattr(torch.optim, name)(_groups(settings, ref_params), foreach=False)
    fast = getattr(fastopt, f"Fused{name}")(_groups(settings, fast_params))
    step_and_compare(ref, fast, ref_params, fast_params, generator(16), 6)


@pytest.mark.parametrize("name", NAMES)
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


@pytest.mark.parametrize("name", NAMES)
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
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    expected_steps = 2.0 if set_to_none else 4.0
    assert all(fast.state[p]["step"].item() == expected_steps for p in fast_params)


@pytest.mark.parametrize("name", NAMES)
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


# -- LR schedulers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_step_lr(name, tensor_lr):
    ref_params, fast_params = make_param_pairs(SHAPES, seed=21)
    base = RICH[name]["lr"]
    lr = torch.tensor(base) if tensor_lr else base
    ref, fast = optimizer_pair(name, ref_params, fast_params, **{**RICH[name], "lr": lr})
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    fast_sched = torch.optim.lr_scheduler.StepLR(fast, step_size=3, gamma=0.5)
    gen = generator(22)
    for step in range(12):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        fast.step()
        ref_sched.step()
        fast_sched.step()
        assert isinstance(fast.param_groups[0]["lr"], torch.Tensor) == tensor_lr
        assert float(fast.param_groups[0]["lr"]) == pytest.approx(base * 0.5 ** ((step + 1) // 3))
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")


@pytest.mark.parametrize("name", NAMES)
def test_cosine_annealing_with_warm_restarts(name):
    ref_params, fast_params = make_param_pairs(SHAPES, seed=23)
    ref, fast = optimizer_pair(name, ref_params, fast_params, **RICH[name])
    scheds = [
        torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4, eta_min=1e-4)
        for opt in (ref, fast)
    ]
    gen = generator(24)
    for step in range(10):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        fast.step()
        for s in scheds:
            s.step()
        assert fast.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")


def test_one_cycle_lr_cycles_rmsprops_momentum():
    """OneCycleLR with cycle_momentum drives RMSprop's `momentum` every step: the kernel must
    read it from the group each step."""
    ref_params, fast_params = make_param_pairs(SHAPES, seed=25)
    ref, fast = optimizer_pair("RMSprop", ref_params, fast_params, lr=0.01, momentum=0.9)
    kwargs = dict(max_lr=0.05, total_steps=12, cycle_momentum=True, base_momentum=0.5)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(opt, **kwargs) for opt in (ref, fast)]
    gen = generator(26)
    seen = set()
    for step in range(12):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        fast.step()
        if step < 11:  # OneCycleLR refuses to step past total_steps
            for s in scheds:
                s.step()
        assert fast.param_groups[0]["momentum"] == ref.param_groups[0]["momentum"]
        seen.add(fast.param_groups[0]["momentum"])
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    assert len(seen) > 5  # momentum really moved


# -- GradScaler ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_fastopt_takes_the_fused_amp_path(name):
    assert getattr(fastopt, f"Fused{name}")._step_supports_amp_scaling is True


def _model(device, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 7)).to(device)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [None, float("inf"), float("nan")], ids=["finite", "inf", "nan"])
def test_grad_scaler_matches_torch_and_skips_a_non_finite_step(device, name, bad):
    """Torch unscales before its step, fastopt inside the kernel, storing the grads back
    unscaled. At step 2 an inf / NaN grad (if `bad`): every param, grad, state tensor and step
    count as before; only the scale changes."""
    ref_model = _model(device, seed=27)
    fast_model = copy.deepcopy(ref_model)
    ref_params, fast_params = list(ref_model.parameters()), list(fast_model.parameters())
    ref, fast = optimizer_pair(name, ref_params, fast_params, **RICH[name])
    scalers = [torch.amp.GradScaler(device, 2.0**12, growth_interval=2) for _ in range(2)]
    gen = generator(28)
    for step in range(6):
        x, y = torch.randn(5, 13, generator=gen).to(device), torch.randn(5, 7, generator=gen)
        for model, opt, scaler in zip((ref_model, fast_model), (ref, fast), scalers, strict=True):
            opt.zero_grad()
            scaler.scale(nn.functional.mse_loss(model(x), y.to(device))).backward()
            if step == 2 and bad is not None:
                model[2].weight.grad[3, 4] = bad
        before, scale = snapshot(fast, fast_params), scalers[1].get_scale()
        scaled = [p.grad.clone() for p in fast_params]
        for opt, scaler in zip((ref, fast), scalers, strict=True):
            scaler.step(opt)
            scaler.update()
        where = f"step {step}"
        assert scalers[1].get_scale() == scalers[0].get_scale(), where
        if step == 2 and bad is not None:
            assert_unchanged(fast, fast_params, before)
            assert scalers[1].get_scale() == scale / 2
            continue
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=where)
        for p, g in zip(fast_params, scaled, strict=True):
            torch.testing.assert_close(p.grad, g / scale, rtol=0, atol=0, msg=where)
    expected = 5 if bad is not None else 6
    assert all(fast.state[p]["step"].item() == expected for p in fast_params)


# -- the functional ops: grad_scale and found_inf ----------------------------------------------


def _functional_state(name, params, gen, options):
    """Mid-training state for `params`, by state key (RMSprop's square_avg above grad_avg**2)."""

    def rand(p, scale=1.0):
        return scale * torch.rand(p.shape, generator=gen).to(p.dtype)

    state = {}
    for key in state_keys(name, options):
        if key in ("momentum_buffer", "grad_avg"):
            state[key] = [0.1 * torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]
        else:
            state[key] = [rand(p) + 0.1 for p in params]
    if "grad_avg" in state:
        pairs = zip(state["square_avg"], state["grad_avg"], strict=True)
        state["square_avg"] = [s + g * g for s, g in pairs]
    return state


def _call_functional(name, params, grads, state, steps, options, **amp):
    """fastopt.functional.<name>_step_ with the state lists in the op's order."""
    f = fastopt.functional
    lr = options["lr"]
    if name == "RMSprop":
        f.rmsprop_step_(
            params, grads, state["square_avg"], state.get("momentum_buffer", []),
            state.get("grad_avg", []), steps, lr=lr, alpha=options["alpha"], eps=1e-8,
            weight_decay=options["weight_decay"], momentum=options["momentum"],
            centered=options["centered"], **amp,
        )  # fmt: skip
    elif name == "Adagrad":
        f.adagrad_step_(
            params, grads, state["sum"], steps, lr=lr, lr_decay=options["lr_decay"],
            weight_decay=options["weight_decay"], **amp,
        )  # fmt: skip
    else:
        f.adadelta_step_(
            params, grads, state["square_avg"], state["acc_delta"], steps, lr=lr,
            rho=options["rho"], eps=1e-6, weight_decay=options["weight_decay"], **amp,
        )  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_unscales_and_stores_grads_unscaled(name, dtype):
    gen = generator(29)
    params = [p.detach() for p in make_param_pairs(SHAPES, dtype, seed=30)[1]]
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    state = _functional_state(name, params, gen, RICH[name])
    steps = [torch.tensor(4.0) for _ in params]
    scale = 1000.0  # not a power of two
    scaled = [g * scale for g in grads]
    unscaled = [s / torch.tensor(scale, dtype=torch.float32).to(dtype) for s in scaled]
    # The reference: torch on the unscaled grads, from the same state.
    ref_params = [p.clone().requires_grad_() for p in params]
    eps = {"RMSprop": 1e-8, "Adagrad": 1e-10, "Adadelta": 1e-6}[name]
    ref = getattr(torch.optim, name)(ref_params, foreach=False, eps=eps, **RICH[name])
    for i, p in enumerate(ref_params):
        p.grad = unscaled[i].clone()
        ref.state[p] = dict(step=steps[i].clone(), **{k: v[i].clone() for k, v in state.items()})
    ref.step()
    options = {**dict(alpha=0.99, momentum=0.0, centered=False), **RICH[name]}
    _call_functional(
        name, params, scaled, state, steps, options,
        grad_scale=torch.tensor(scale), found_inf=torch.tensor(0.0),
    )  # fmt: skip
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-12)
    for i, r in enumerate(ref_params):
        where = f"param {i}"
        torch.testing.assert_close(scaled[i], unscaled[i], rtol=rtol, atol=atol, msg=where)
        torch.testing.assert_close(params[i], r.detach(), rtol=rtol, atol=atol, msg=where)
        for key, values in state.items():
            torch.testing.assert_close(
                values[i], ref.state[r][key], rtol=rtol, atol=atol, msg=f"{where} {key}"
            )
        assert steps[i].item() == 5.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("with_scale", [False, True])
def test_functional_found_inf_changes_nothing(name, with_scale):
    gen = generator(31)
    params = [p.detach() for p in make_param_pairs(SHAPES, seed=32)[1]]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    state = _functional_state(name, params, gen, RICH[name])
    steps = [torch.tensor(4.0) for _ in params]
    tensors = {"params": params, "grads": grads, "steps": steps, **state}
    before = {k: [t.clone() for t in v] for k, v in tensors.items()}
    options = {**dict(alpha=0.99, momentum=0.0, centered=False), **RICH[name]}
    options["lr"] = torch.tensor(options["lr"])
    _call_functional(
        name, params, grads, state, steps, options,
        grad_scale=torch.tensor(64.0) if with_scale else None, found_inf=torch.tensor(1.0),
    )  # fmt: skip
    for key, values in tensors.items():
        for i, (t, b) in enumerate(zip(values, before[key], strict=True)):
            assert torch.equal(t, b), f"{key}[{i}] changed"
