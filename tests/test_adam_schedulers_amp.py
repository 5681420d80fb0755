"""LR schedulers and torch.amp.GradScaler with FusedAdam, against torch.optim.Adam(foreach=False).

GradScaler talks to fastopt through the contract of torch's fused optimizers
(`_step_supports_amp_scaling`, `grad_scale`, `found_inf`): the kernel unscales, stores the grads
back unscaled, and skips the whole step (step counts included) when an inf/NaN was found.
"""

from __future__ import annotations

import copy
import dataclasses

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


def test_fastopt_takes_the_fused_amp_path():
    assert fastopt.FusedAdam._step_supports_amp_scaling is True
    assert fastopt.FusedAdamW._step_supports_amp_scaling is True


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
