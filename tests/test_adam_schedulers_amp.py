"""LR schedulers and torch.amp.GradScaler with FusedAdam, against torch.optim.Adam(foreach=False).

GradScaler talks to fastopt through the contract of torch's fused optimizers
(`_step_supports_amp_scaling`, `grad_scale`, `found_inf`): the kernel unscales, stores the grads
back unscaled, and skips the whole step (step counts included) when an inf/NaN was found.
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
)
from torch import nn

import fastopt


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_step_lr(tensor_lr):
    ref_params, fast_params = make_param_pairs(SHAPES, seed=1)
    lr = torch.tensor(0.04) if tensor_lr else 0.04
    ref, fast = optimizer_pair("AdamW", ref_params, fast_params, lr=lr, amsgrad=True)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=3, gamma=0.5)
    fast_sched = torch.optim.lr_scheduler.StepLR(fast, step_size=3, gamma=0.5)
    gen = generator(2)
    for step in range(15):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        fast.step()
        ref_sched.step()
        fast_sched.step()
        assert float(fast.param_groups[0]["lr"]) == pytest.approx(0.04 * 0.5 ** ((step + 1) // 3))
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
def test_one_cycle_lr_changes_lr_and_betas(name):
    ref_params, fast_params = make_param_pairs(SHAPES, seed=3)
    ref, fast = optimizer_pair(name, ref_params, fast_params, lr=0.01, weight_decay=0.05)
    kwargs = dict(max_lr=0.05, total_steps=15, cycle_momentum=True, base_momentum=0.8)
    ref_sched = torch.optim.lr_scheduler.OneCycleLR(ref, **kwargs)
    fast_sched = torch.optim.lr_scheduler.OneCycleLR(fast, **kwargs)
    gen = generator(4)
    seen_beta1 = set()
    for step in range(15):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        fast.step()
        if step < 14:  # OneCycleLR refuses to step past total_steps
            ref_sched.step()
            fast_sched.step()
        assert fast.param_groups[0]["betas"] == ref.param_groups[0]["betas"]
        assert fast.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
        seen_beta1.add(fast.param_groups[0]["betas"][0])
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    assert len(seen_beta1) > 5  # beta1 really moved


# -- GradScaler ------------------------------------------------------------------------------


def _model_pair(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(13, 33), nn.Tanh(), nn.Linear(33, 7))
    return model, copy.deepcopy(model)


def _scaled_backward(model, scaler, x, y):
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()


def _assert_models_match(ref_opt, fast_opt, ref_model, fast_model, where):
    ref_params, fast_params = list(ref_model.parameters()), list(fast_model.parameters())
    assert_matches_reference(ref_opt, fast_opt, ref_params, fast_params, **FP32, where=where)


def test_fastopt_takes_the_fused_amp_path():
    assert fastopt.FusedAdam._step_supports_amp_scaling is True
    assert fastopt.FusedAdamW._step_supports_amp_scaling is True


def test_grad_scaler_steps_match_torch():
    ref_model, fast_model = _model_pair(5)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01, foreach=False)
    fast_opt = fastopt.FusedAdam(fast_model.parameters(), lr=0.01)
    kwargs = dict(init_scale=2.0**12, growth_interval=2)  # the scale grows during the test
    ref_scaler, fast_scaler = (
        torch.amp.GradScaler("cpu", **kwargs),
        torch.amp.GradScaler("cpu", **kwargs),
    )
    gen = generator(6)
    fast_params = list(fast_model.parameters())
    for step in range(6):
        x, y = torch.randn(5, 13, generator=gen), torch.randn(5, 7, generator=gen)
        for model, opt, scaler in (
            (ref_model, ref_opt, ref_scaler),
            (fast_model, fast_opt, fast_scaler),
        ):
            opt.zero_grad()
            _scaled_backward(model, scaler, x, y)
            if opt is fast_opt:
                scaled = [p.grad.clone() for p in fast_params]
                scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
        assert fast_scaler.get_scale() == ref_scaler.get_scale()
        assert not hasattr(fast_opt, "grad_scale") and not hasattr(fast_opt, "found_inf")
        _assert_models_match(ref_opt, fast_opt, ref_model, fast_model, f"step {step}")
        # Like torch's fused optimizers, fastopt stores the grads back unscaled.
        for p, g in zip(fast_params, scaled, strict=True):
            torch.testing.assert_close(p.grad, g / scale, rtol=0, atol=0)
    assert fast_scaler.get_scale() > 2.0**12


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_grad_scaler_skips_a_step_with_a_non_finite_grad(bad):
    ref_model, fast_model = _model_pair(7)
    ref_opt = torch.optim.AdamW(ref_model.parameters(), lr=0.01, amsgrad=True, foreach=False)
    fast_opt = fastopt.FusedAdamW(fast_model.parameters(), lr=0.01, amsgrad=True)
    ref_scaler, fast_scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    gen = generator(8)
    fast_params = list(fast_model.parameters())
    for step in range(5):
        x, y = torch.randn(5, 13, generator=gen), torch.randn(5, 7, generator=gen)
        for model, opt, scaler in (
            (ref_model, ref_opt, ref_scaler),
            (fast_model, fast_opt, fast_scaler),
        ):
            opt.zero_grad()
            _scaled_backward(model, scaler, x, y)
            if step == 2:
                model[2].weight.grad[3, 4] = bad
            if opt is fast_opt:
                before, scale_before = snapshot(opt, fast_params), scaler.get_scale()
            scaler.step(opt)
            scaler.update()
        if step == 2:
            # Every param, grad, state tensor and step count as before; only the scale changed.
            assert_unchanged(fast_opt, fast_params, before)
            assert fast_scaler.get_scale() == scale_before / 2
            assert all(fast_opt.state[p]["step"].item() == 2 for p in fast_params)
        _assert_models_match(ref_opt, fast_opt, ref_model, fast_model, f"step {step}")
    assert all(fast_opt.state[p]["step"].item() == 4 for p in fast_params)


def test_grad_scaler_unscale_then_clip():
    """scaler.unscale_ before clipping: the kernel must not unscale a second time."""
    ref_model, fast_model = _model_pair(9)
    ref_opt = torch.optim.Adam(ref_model.parameters(), lr=0.01, foreach=False)
    fast_opt = fastopt.FusedAdam(fast_model.parameters(), lr=0.01)
    ref_scaler, fast_scaler = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    gen = generator(10)
    for step in range(4):
        x, y = torch.randn(5, 13, generator=gen), torch.randn(5, 7, generator=gen)
        for model, opt, scaler in (
            (ref_model, ref_opt, ref_scaler),
            (fast_model, fast_opt, fast_scaler),
        ):
            opt.zero_grad()
            _scaled_backward(model, scaler, x, y)
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.05)
            scaler.step(opt)
            scaler.update()
        _assert_models_match(ref_opt, fast_opt, ref_model, fast_model, f"step {step}")


# -- the op path directly --------------------------------------------------------------------


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
def test_functional_unscales_and_stores_grads_unscaled(dtype):
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
def test_functional_found_inf_changes_nothing(amsgrad, with_scale):
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
