"""FusedRMSprop / FusedAdagrad / FusedAdadelta with LR schedulers (with a Tensor lr) and
torch.amp.GradScaler (an inf / NaN step changes nothing); and the functional ops' grad_scale /
found_inf. (State dicts, checkpoints and param groups of every optimizer: test_checkpoint.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    FP32,
    SHAPES,
    assert_matches_reference,
    assert_unchanged,
    generator,
    make_param_pairs,
    optimizer_pair,
    set_grads,
    snapshot,
    state_keys,
)
from torch import nn

import fastopt

NAMES = ["RMSprop", "Adagrad", "Adadelta"]

# One argument set per optimizer with every optional state tensor and path.
RICH = {
    "RMSprop": dict(lr=0.01, alpha=0.9, weight_decay=0.1, momentum=0.5, centered=True),
    "Adagrad": dict(lr=0.1, lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.2),
    "Adadelta": dict(lr=0.5, rho=0.8, weight_decay=0.1),
}


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
