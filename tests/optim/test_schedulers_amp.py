"""LR schedulers (with a Tensor lr) and torch.amp.GradScaler with every fused optimizer, against
torch.optim.*(foreach=False); and the functional ops' grad_scale / found_inf.

GradScaler talks to fastopt through the contract of torch's fused optimizers
(`_step_supports_amp_scaling`, `grad_scale`, `found_inf`): the kernel unscales, stores the grads
back unscaled, and skips the whole step (step counts included) when an inf/NaN was found.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers.optim_cases import NON_ADAM_OPTIMIZERS, OPTIMIZERS, RICH, SHAPES
from helpers.optim_compare import assert_matches_reference, scaler_step_and_compare, state_keys
from helpers.optim_pairs import make_param_pairs, optimizer_pair, set_grads
from helpers.rng import generator
from helpers.snapshot import assert_unchanged, snapshot
from helpers.tolerances import FP32
from torch import nn

import fastopt

# -- LR schedulers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_step_lr(name, tensor_lr):
    ref_params, fast_params = make_param_pairs(SHAPES, seed=21)
    base = RICH[name]["lr"]
    lr = torch.tensor(base) if tensor_lr else base
    ref, fast = optimizer_pair(name, ref_params, fast_params, **{**RICH[name], "lr": lr})
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    fast_sched = torch.optim.lr_scheduler.StepLR(fast, step_size=3, gamma=0.5)
    gen = generator(22)
    for step in range(15):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        fast.step()
        ref_sched.step()
        fast_sched.step()
        assert isinstance(fast.param_groups[0]["lr"], torch.Tensor) == tensor_lr
        assert float(fast.param_groups[0]["lr"]) == pytest.approx(base * 0.5 ** ((step + 1) // 3))
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")


@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
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


# (optimizer, its arguments, OneCycleLR's base_momentum and total_steps, seed): OneCycleLR with
# cycle_momentum drives RMSprop's `momentum` and Adam's beta1 every step.
ONE_CYCLE_CASES = [
    pytest.param("RMSprop", dict(lr=0.01, momentum=0.9), 0.5, 12, 25, id="RMSprop-momentum"),
    *(
        pytest.param(name, dict(lr=0.01, weight_decay=0.05), 0.8, 15, 3, id=f"{name}-betas")
        for name in ("Adam", "AdamW")
    ),
]


def _cycled_momentum(opt):
    group = opt.param_groups[0]
    return group["betas"] if "betas" in group else group["momentum"]


@pytest.mark.parametrize(("name", "options", "base_momentum", "total", "seed"), ONE_CYCLE_CASES)
def test_one_cycle_lr_changes_lr_and_momentum(name, options, base_momentum, total, seed):
    """OneCycleLR with cycle_momentum changes lr and RMSprop's `momentum` / Adam's betas every
    step: the kernel must read them from the group each step."""
    ref_params, fast_params = make_param_pairs(SHAPES, seed=seed)
    ref, fast = optimizer_pair(name, ref_params, fast_params, **options)
    kwargs = dict(max_lr=0.05, total_steps=total, cycle_momentum=True, base_momentum=base_momentum)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(opt, **kwargs) for opt in (ref, fast)]
    gen = generator(seed + 1)
    seen = set()
    for step in range(total):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        fast.step()
        if step < total - 1:  # OneCycleLR refuses to step past total_steps
            for sched in scheds:
                sched.step()
        assert _cycled_momentum(fast) == _cycled_momentum(ref)
        assert fast.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        seen.add(str(_cycled_momentum(fast)))
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    assert len(seen) > 5  # momentum / beta1 really moved


# -- GradScaler ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fastopt_takes_the_fused_amp_path(name):
    assert getattr(fastopt, f"Fused{name}")._step_supports_amp_scaling is True


def _model(device, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 7)).to(device)


@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
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
        scaler_step_and_compare(
            ref, fast, ref_params, fast_params, scalers, f"step {step}",
            skipped=step == 2 and bad is not None,
        )  # fmt: skip
    expected = 5 if bad is not None else 6
    assert all(fast.state[p]["step"].item() == expected for p in fast_params)


# -- GradScaler with FusedAdam / FusedAdamW ----------------------------------------


@dataclasses.dataclass
class _ScaledRun:
    """A small model with its optimizer and its GradScaler. A test trains a torch run and a
    fastopt run side by side, from equal models on the same batches."""

    model: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.model.parameters())

    def backward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """zero_grad, then the backward of the scaled loss on `batch`."""
        self.opt.zero_grad()
        x, y = batch
        self.scaler.scale(nn.functional.mse_loss(self.model(x), y)).backward()

    def step(self) -> None:
        self.scaler.step(self.opt)
        self.scaler.update()


def _scaled_runs(name, device, seed, scaler_kwargs=None, **kwargs) -> tuple[_ScaledRun, _ScaledRun]:
    """A torch.optim.`name`(foreach=False) run and a fastopt.Fused`name` run on `device`, of equal
    models, with optimizer arguments `kwargs` and GradScaler arguments `scaler_kwargs`."""
    torch.manual_seed(seed)
    ref_model = nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 7)).to(device)
    fast_model = copy.deepcopy(ref_model)
    ref_opt, fast_opt = optimizer_pair(
        name, ref_model.parameters(), fast_model.parameters(), **kwargs
    )
    ref_scaler, fast_scaler = (
        torch.amp.GradScaler(device, **(scaler_kwargs or {})) for _ in range(2)
    )
    return _ScaledRun(ref_model, ref_opt, ref_scaler), _ScaledRun(fast_model, fast_opt, fast_scaler)


def _batch(gen, device):
    """Inputs and targets for the models of `_scaled_runs`, drawn on the CPU."""
    return torch.randn(5, 13, generator=gen).to(device), torch.randn(5, 7, generator=gen).to(device)


def _assert_runs_match(ref: _ScaledRun, fast: _ScaledRun, where: str) -> None:
    assert fast.scaler.get_scale() == ref.scaler.get_scale(), where
    assert_matches_reference(ref.opt, fast.opt, ref.params, fast.params, **FP32, where=where)


def _assert_stored_back_unscaled(params, scaled_grads, scale) -> None:
    """Like torch's fused optimizers, fastopt stores the grads back unscaled (exactly)."""
    for p, g in zip(params, scaled_grads, strict=True):
        torch.testing.assert_close(p.grad, g / scale, rtol=0, atol=0)


def test_grad_scaler_steps_match_torch(device):
    # growth_interval=2: the scale grows during the test.
    scaler_kwargs = dict(init_scale=2.0**12, growth_interval=2)
    ref, fast = _scaled_runs("Adam", device, seed=5, scaler_kwargs=scaler_kwargs, lr=0.01)
    gen = generator(6)
    for step in range(6):
        batch = _batch(gen, device)
        for run in (ref, fast):
            run.backward(batch)
        scaled, scale = [p.grad.clone() for p in fast.params], fast.scaler.get_scale()
        for run in (ref, fast):
            run.step()
        assert not hasattr(fast.opt, "grad_scale") and not hasattr(fast.opt, "found_inf")
        _assert_runs_match(ref, fast, f"step {step}")
        _assert_stored_back_unscaled(fast.params, scaled, scale)
    assert fast.scaler.get_scale() > 2.0**12


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_grad_scaler_skips_a_step_with_a_non_finite_grad(device, name, bad):
    ref, fast = _scaled_runs(name, device, seed=7, lr=0.01, amsgrad=True)
    gen = generator(8)
    for step in range(5):
        batch = _batch(gen, device)
        for run in (ref, fast):
            run.backward(batch)
            if step == 2:
                run.model[2].weight.grad[3, 4] = bad
        before, scale_before = snapshot(fast.opt, fast.params), fast.scaler.get_scale()
        scaled = [p.grad.clone() for p in fast.params]
        for run in (ref, fast):
            run.step()
        if step == 2:
            # Every param, grad, state tensor and step count as before; only the scale changed.
            assert_unchanged(fast.opt, fast.params, before)
            assert fast.scaler.get_scale() == scale_before / 2
            assert all(fast.opt.state[p]["step"].item() == 2 for p in fast.params)
        else:
            _assert_stored_back_unscaled(fast.params, scaled, scale_before)
        _assert_runs_match(ref, fast, f"step {step}")
    assert all(fast.opt.state[p]["step"].item() == 4 for p in fast.params)


def test_grad_scaler_unscale_then_clip():
    """scaler.unscale_ before clipping: the kernel must not unscale a second time."""
    ref, fast = _scaled_runs("Adam", "cpu", seed=9, lr=0.01)
    gen = generator(10)
    for step in range(4):
        batch = _batch(gen, "cpu")
        for run in (ref, fast):
            run.backward(batch)
            run.scaler.unscale_(run.opt)
            nn.utils.clip_grad_norm_(run.model.parameters(), max_norm=0.05)
            run.step()
        _assert_runs_match(ref, fast, f"step {step}")


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


@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
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


@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
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


# -- adam_step_ directly --------------------------------------------------------------------


def _functional_inputs(dtype, seed, amsgrad=True):
    params = [p.detach() for p in make_param_pairs(SHAPES, dtype, seed=seed)[1]]
    gen = generator(seed + 1)
    exp_avgs = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    exp_avg_sqs = [torch.rand(p.shape, generator=gen).to(dtype) for p in params]
    max_sqs = [v + torch.rand(v.shape, generator=gen).to(dtype) for v in exp_avg_sqs]
    steps = [torch.tensor(4.0) for _ in params]
    grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
    return params, grads, exp_avgs, exp_avg_sqs, max_sqs if amsgrad else [], steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_adam_unscales_and_stores_grads_unscaled(dtype):
    params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps = _functional_inputs(dtype, seed=11)
    scale = 1000.0  # not a power of two
    scaled = [g * scale for g in grads]
    unscaled = [s / torch.tensor(scale, dtype=torch.float32).to(dtype) for s in scaled]
    # The reference: torch's Adam on the unscaled grads, from the same state.
    ref_params = [p.clone().requires_grad_() for p in params]
    ref = torch.optim.Adam(ref_params, lr=0.01, weight_decay=0.1, amsgrad=True, foreach=False)
    for i, p in enumerate(ref_params):
        p.grad = unscaled[i].clone()
        ref.state[p] = dict(
            step=steps[i].clone(),
            exp_avg=exp_avgs[i].clone(),
            exp_avg_sq=exp_avg_sqs[i].clone(),
            max_exp_avg_sq=max_sqs[i].clone(),
        )
    ref.step()
    fastopt.functional.adam_step_(
        params,
        scaled,
        exp_avgs,
        exp_avg_sqs,
        max_sqs,
        steps,
        lr=0.01,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.1,
        amsgrad=True,
        grad_scale=torch.tensor(scale),
        found_inf=torch.tensor(0.0),
    )
    rtol, atol = (1e-5, 1e-6) if dtype == torch.float32 else (1e-12, 1e-12)
    for i, r in enumerate(ref_params):
        torch.testing.assert_close(scaled[i], unscaled[i], rtol=rtol, atol=atol)  # stored back
        torch.testing.assert_close(params[i], r.detach(), rtol=rtol, atol=atol)
        state = ref.state[r]
        torch.testing.assert_close(exp_avgs[i], state["exp_avg"], rtol=rtol, atol=atol)
        torch.testing.assert_close(exp_avg_sqs[i], state["exp_avg_sq"], rtol=rtol, atol=atol)
        torch.testing.assert_close(max_sqs[i], state["max_exp_avg_sq"], rtol=rtol, atol=atol)
        assert steps[i].item() == 5.0


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("with_scale", [False, True])
def test_functional_adam_found_inf_changes_nothing(amsgrad, with_scale):
    inputs = _functional_inputs(torch.float32, seed=12, amsgrad=amsgrad)
    copies = [[t.clone() for t in ts] for ts in inputs]
    fastopt.functional.adam_step_(
        *inputs,
        lr=torch.tensor(0.01),
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        amsgrad=amsgrad,
        grad_scale=torch.tensor(64.0) if with_scale else None,
        found_inf=torch.tensor(1.0),
    )
    for name, tensors, before in zip(
        ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "steps"],
        inputs,
        copies,
        strict=True,
    ):
        for i, (t, b) in enumerate(zip(tensors, before, strict=True)):
            assert torch.equal(t, b), f"{name}[{i}] changed"


def test_grad_scale_attributes_without_grad_scaler():
    """What GradScaler does, by hand: the optimizer's grad_scale / found_inf attributes."""
    ref_params, fast_params = make_param_pairs(SHAPES, seed=13)
    ref, fast = optimizer_pair("Adam", ref_params, fast_params, lr=0.01)
    gen = generator(14)
    for step in range(3):
        set_grads(gen, ref_params, fast_params)
        for p in fast_params:
            p.grad.mul_(256.0)
        fast.grad_scale = torch.tensor(256.0)
        fast.found_inf = torch.tensor(0.0)
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
        for r, f in zip(ref_params, fast_params, strict=True):
            torch.testing.assert_close(f.grad, r.grad, rtol=0, atol=0)
