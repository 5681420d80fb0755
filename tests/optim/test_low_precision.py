"""Every fused optimizer in bf16 / fp16 against torch.optim.*(foreach=False): a run is judged
against the error of a plain torch run in the same precision, both measured against an fp32
reference; one step from a random state is the fp32 step rounded once; a group of mixed dtypes
steps each param as a group of its own dtype would. RMSprop / Adagrad / Adadelta under every CPU
instruction set (each converts to and from float in its own way)."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers.against_torch import run_against_torch
from helpers.optim_cases import NON_ADAM_OPTIMIZERS, RICH
from helpers.optim_compare import assert_state_format, state_keys
from helpers.optim_pairs import mixed_dtype_starts, set_grads
from helpers.rng import generator
from helpers.tolerances import TOLERANCES, ulp
from helpers.torch_configs import LOW_PRECISION_CONFIG_CASES

import fastopt

STEPS = 10

LOW_PRECISION_OPTIONS = [
    pytest.param(dict(amsgrad=a, maximize=m, weight_decay=wd), id=f"ams{int(a)}-max{int(m)}-wd{wd}")
    for a, m, wd in itertools.product([False, True], [False, True], [0.0, 0.1])
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("options", LOW_PRECISION_OPTIONS)
def test_low_precision_error_is_within_torchs(dtype, name, options):
    """fastopt in bf16/fp16 is at most ~2x as far from an fp32 reference as torch in bf16/fp16."""
    run_against_torch(name, dtype, options, seed=21)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("name", "options"), LOW_PRECISION_CONFIG_CASES)
def test_low_precision_error_is_within_torchs_under_every_isa(cpu_isa, dtype, name, options):
    """fastopt in bf16/fp16 is at most ~2x as far from an fp32 reference as torch in bf16/fp16
    (each instruction set converts to and from float in its own way)."""
    run_against_torch(name, dtype, options, seed=21, steps=STEPS)


# -- one rounding per element ---------------------------------------------------------------


def _random_state(name: str, n: int, dtype: torch.dtype, gen: torch.Generator) -> dict:
    """A plausible mid-training state in `dtype` (RMSprop's square_avg above grad_avg**2, so the
    centered variance stays positive once rounded), with every state tensor of `name`."""

    def rand(scale, offset=0.0):
        return scale * torch.rand(n, generator=gen) + offset

    if name in ("Adam", "AdamW"):
        return dict(
            exp_avg=(0.1 * torch.randn(n, generator=gen)).to(dtype),
            exp_avg_sq=(0.01 * torch.rand(n, generator=gen)).to(dtype),
            max_exp_avg_sq=(0.02 * torch.rand(n, generator=gen)).to(dtype),
        )
    if name == "RMSprop":
        grad_avg = (0.1 * torch.randn(n, generator=gen)).to(dtype)
        return dict(
            square_avg=(grad_avg.float().square() + rand(0.01, 1e-3)).to(dtype),
            momentum_buffer=(0.1 * torch.randn(n, generator=gen)).to(dtype),
            grad_avg=grad_avg,
        )
    if name == "Adagrad":
        return dict(sum=rand(2.0, 1e-1).to(dtype))
    return dict(square_avg=rand(0.5, 1e-3).to(dtype), acc_delta=rand(1e-3, 1e-5).to(dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_low_precision_step_is_the_fp32_step_rounded_once(dtype, name, amsgrad):
    """One bf16/fp16 step from a random state equals torch's fp32 step from the same (upcast)
    values, rounded once to the low precision: within one ulp of it, element by element (under
    the default CPU instruction set: under `baseline`, exp_avg near 0 keeps a residue of a few
    fp32 ulps, as the optimizers below do under every one)."""
    kwargs = dict(lr=0.01, weight_decay=0.1, amsgrad=amsgrad, eps=1e-3)
    _assert_rounded_once(name, kwargs, dtype, residue_ulps=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
def test_low_precision_step_is_the_fp32_step_rounded_once_under_every_isa(cpu_isa, dtype, name):
    """As above, under every CPU instruction set; plus, where the fp32 result cancels to near 0,
    a few fp32 ulps of the quantity's magnitude (an equally exact fp32 evaluation in another
    order, e.g. with FMA, leaves a residue there)."""
    kwargs = {**RICH[name], "eps": 1e-3 if name != "Adadelta" else 1e-6}
    _assert_rounded_once(name, kwargs, dtype, residue_ulps=4)


def _assert_rounded_once(name, kwargs, dtype, residue_ulps):
    """One step of Fused`name` in `dtype` from a random state is within one ulp (plus
    `residue_ulps` fp32 ulps of the quantity's magnitude) of torch's fp32 step, rounded."""
    gen = generator(41)
    n = 4 * 4097
    param = torch.randn(n, generator=gen).to(dtype)
    grad = torch.randn(n, generator=gen).to(dtype)
    keys = state_keys(name, kwargs)
    state = {k: v for k, v in _random_state(name, n, dtype, gen).items() if k in keys}
    assert set(keys) == set(state)
    high = param.float().requires_grad_()
    high.grad = grad.float()
    ref = getattr(torch.optim, name)([high], foreach=False, **kwargs)
    ref.state[high] = dict(step=torch.tensor(3.0), **{k: v.float() for k, v in state.items()})
    fast_param = param.clone().requires_grad_()
    fast_param.grad = grad.clone()
    fast = getattr(fastopt, f"Fused{name}")([fast_param], **kwargs)
    fast.state[fast_param] = dict(
        step=torch.tensor(3.0), **{k: v.clone() for k, v in state.items()}
    )
    ref.step()
    fast.step()
    for key in ("param", *keys):
        value = fast_param.detach() if key == "param" else fast.state[fast_param][key]
        exact = (high.detach() if key == "param" else ref.state[high][key]).to(dtype)
        assert value.dtype == dtype, key
        error = (value.float() - exact.float()).abs()
        residue = residue_ulps * torch.finfo(torch.float32).eps * exact.float().abs().max()
        assert bool((error <= ulp(exact) + residue).all()), f"{key}: {error.max().item()}"
    assert fast.state[fast_param]["step"].item() == 4.0


# -- a group of mixed dtypes ----------------------------------------------------------------


def test_adamw_mixed_dtypes_in_one_group(device):
    """One group (so one kernel call) holding fp32, fp64, bf16 and fp16 params: each dtype is
    computed as it is alone, with state in the param's dtype."""
    gen = generator(31)
    starts = mixed_dtype_starts(gen, device)
    fast = [s.clone().requires_grad_() for s in starts]
    # The reference: torch in the same dtype for fp32/fp64, fp32 for the low-precision ones.
    ref = [s.clone().requires_grad_() for s in starts[:2]] + [starts[4].clone().requires_grad_()]
    high = [s.float().requires_grad_() for s in starts[2:4]]
    low = [s.clone().requires_grad_() for s in starts[2:4]]
    kwargs = dict(lr=1e-2, eps=1e-3, weight_decay=0.1, amsgrad=True)
    fast_opt = fastopt.FusedAdamW(fast, **kwargs)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kwargs)
    high_opt = torch.optim.AdamW(high, foreach=False, **kwargs)
    low_opt = torch.optim.AdamW(low, foreach=False, **kwargs)
    for step in range(5):
        grads = set_grads(gen, fast)
        for p, g in zip(ref, [grads[0], grads[1], grads[4]], strict=True):
            p.grad = g.clone()
        for p, q, g in zip(high, low, grads[2:4], strict=True):
            p.grad, q.grad = g.float(), g.clone()
        for opt in (fast_opt, ref_opt, high_opt, low_opt):
            opt.step()
        for f, r in zip([fast[0], fast[1], fast[4]], ref, strict=True):
            rtol, atol = TOLERANCES[r.dtype]
            torch.testing.assert_close(f, r, rtol=rtol, atol=atol, msg=f"step {step}")
        for f, h, lo in zip(fast[2:4], high, low, strict=True):
            fast_error = (f.double() - h.double()).abs().max().item()
            torch_error = (lo.double() - h.double()).abs().max().item()
            slack = torch.finfo(f.dtype).eps * h.abs().max().item()
            assert fast_error <= 2 * torch_error + slack, f"step {step} {f.dtype}"
    for p in fast:
        assert_state_format(fast_opt, p, state_keys("AdamW", dict(amsgrad=True)))
        assert fast_opt.state[p]["step"].item() == 5


@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
def test_mixed_dtypes_in_one_group(device, name):
    """One group (one kernel call) of fp32, fp64, bf16 and fp16 params: each param ends as it
    does in a group of its own dtype; fp32 / fp64 match torch, state is in the param's dtype."""
    gen = generator(31)
    starts = mixed_dtype_starts(gen, device)
    kwargs = {**RICH[name], "eps": 1e-3 if name != "Adadelta" else 1e-6}
    mixed = [s.clone().requires_grad_() for s in starts]
    alone = [s.clone().requires_grad_() for s in starts]
    ref = [s.clone().requires_grad_() for s in starts]
    mixed_opt = getattr(fastopt, f"Fused{name}")(mixed, **kwargs)
    alone_opts = [getattr(fastopt, f"Fused{name}")([p], **kwargs) for p in alone]
    ref_opt = getattr(torch.optim, name)(ref, foreach=False, **kwargs)
    for step in range(5):
        grads = set_grads(gen, mixed, alone)
        for r, g in zip(ref, grads, strict=True):
            r.grad = g.clone()
        for opt in (mixed_opt, *alone_opts, ref_opt):
            opt.step()
        for i, (m, a, r) in enumerate(zip(mixed, alone, ref, strict=True)):
            where = f"step {step} param {i} {m.dtype}"
            if m.dtype in TOLERANCES:
                rtol, atol = TOLERANCES[m.dtype]
                torch.testing.assert_close(m, r, rtol=rtol, atol=atol, msg=where)
            error = (m.detach().float() - a.detach().float()).abs()
            assert bool((error <= ulp(a.detach())).all()), f"{where}: {error.max().item()}"
    for p in mixed:
        state = mixed_opt.state[p]
        assert set(state) == {"step", *state_keys(name, kwargs)}
        assert all(state[k].dtype == p.dtype for k in state if k != "step")
        assert state["step"].item() == 5
