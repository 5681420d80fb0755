"""FusedAdam / FusedAdamW against torch.optim.Adam / AdamW(foreach=False), step by step.

fp32 and fp64 must match to rounding, every option combined, params and every state tensor
after every step; fp32 under every CPU instruction set. bf16 / fp16 are judged against the error
of a plain torch run in the same precision, both measured against an fp32 reference.
"""

from __future__ import annotations

import inspect
import itertools
import os
import subprocess
import sys
import zlib

import pytest
import torch
from conftest import (
    ADAM_OPTIONS,
    TOLERANCES,
    assert_matches_reference,
    assert_state_format,
    generator,
    make_param_pairs,
    optimizer_pair,
    run_against_torch,
    set_grads,
    state_keys,
    step_and_compare,
    supported_cpu_isas,
    ulp,
)

import fastopt
from fastopt import _extension

STEPS = 10


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("options", ADAM_OPTIONS)
def test_fp32_matches_torch_under_every_isa(cpu_isa, name, options):
    run_against_torch(
        name,
        torch.float32,
        options,
        steps=STEPS,
        seed=zlib.crc32(f"{cpu_isa}-{name}".encode()) % 1000,
    )


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("options", ADAM_OPTIONS)
def test_fp64_matches_torch(name, options):
    run_against_torch(name, torch.float64, options, seed=7, steps=STEPS)


def test_isa_fixture_covers_every_supported_isa():
    module = _extension.cpu_module()
    best = module.best_cpu_isa()
    assert best in ("baseline", "avx2", "avx512")
    assert supported_cpu_isas()[-1] == best
    assert module.active_cpu_isa() in supported_cpu_isas()
    with pytest.raises(ValueError, match="unknown CPU instruction set"):
        module.set_cpu_isa("sse9")
    assert module.active_cpu_isa() in supported_cpu_isas()


_ISA_PROBE = """
import torch, fastopt
p = torch.randn(3, requires_grad=True)
p.grad = torch.randn(3)
try:
    fastopt.FusedAdam([p]).step()
    print("active", fastopt._extension.cpu_module().active_cpu_isa())
except RuntimeError as e:
    print("error", e)
"""


def test_fastopt_cpu_isa_environment_variable():
    """FASTOPT_CPU_ISA caps the choice at startup; an unknown name is an error naming the valid
    ones (run in fresh processes: the choice is made once per process)."""

    def run(value):
        env = dict(os.environ, FASTOPT_CPU_ISA=value)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            [sys.executable, "-c", _ISA_PROBE], env=env, cwd=root, capture_output=True,
            text=True, timeout=120, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    assert run("baseline") == "active baseline"
    assert run("sse9") == (
        "error unknown CPU instruction set 'sse9'; expected one of: baseline, avx2, avx512"
    )


@pytest.mark.skipif(
    _extension.cpu_module().best_cpu_isa() == "avx512", reason="this CPU supports every ISA"
)
def test_unsupported_isa_is_refused():
    module = _extension.cpu_module()
    before = module.active_cpu_isa()
    with pytest.raises(ValueError, match="this CPU cannot run avx512"):
        module.set_cpu_isa("avx512")
    assert module.active_cpu_isa() == before


def test_many_threads_split_tensors_mid_way():
    """Enough elements that several threads share the work, with thread boundaries falling
    inside tensors, around empty ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, previous))
    try:
        shapes = [(40000,), (7,), (0,), (30001,), (1,), (123, 101), (0,)]
        run_against_torch(
            "Adam",
            torch.float32,
            dict(amsgrad=True, maximize=False, weight_decay=0.1, tensor_lr=False),
            seed=3,
            steps=4,
            shapes=shapes,
        )
    finally:
        torch.set_num_threads(previous)


def test_betas_eps_and_params_at_offsets():
    """Non-default betas and eps, and params that start at odd offsets into a larger buffer."""
    gen = generator(11)
    buffer = torch.randn(1 + 7 + 4097 + 2, generator=gen)
    views = [buffer[1:8].view(7), buffer[8 : 8 + 4097], buffer[-1:]]
    ref_params = [v.clone().requires_grad_() for v in views]
    fast_params = [v.detach().requires_grad_() for v in views]  # leaves that share `buffer`
    assert fast_params[0].storage_offset() == 1
    kwargs = dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05, amsgrad=True)
    ref, fast = optimizer_pair("AdamW", ref_params, fast_params, **kwargs)
    step_and_compare(ref, fast, ref_params, fast_params, gen, 6)


def test_nan_and_inf_grads_propagate_like_torch():
    """Without a GradScaler, a non-finite grad poisons the param and state as it does in torch."""
    ref_params, fast_params = make_param_pairs([(9,), (4097,)], seed=5)
    ref, fast = optimizer_pair("Adam", ref_params, fast_params, lr=0.01, amsgrad=True)
    gen = generator(6)
    for step in range(2):
        set_grads(gen, ref_params, fast_params)
        if step == 1:
            for params in (ref_params, fast_params):
                params[0].grad[2] = float("nan")
                params[1].grad[5] = float("inf")
        ref.step()
        fast.step()
        for r, f in zip(ref_params, fast_params, strict=True):
            torch.testing.assert_close(f, r, rtol=1e-5, atol=1e-6, equal_nan=True)
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                torch.testing.assert_close(
                    fast.state[f][key], ref.state[r][key], rtol=1e-5, atol=1e-6, equal_nan=True
                )
    assert fast_params[0][2].isnan() and fast_params[1][5].isnan()


@pytest.mark.parametrize(("name", "weight_decay"), [("Adam", 0.0), ("AdamW", 0.0), ("AdamW", 0.01)])
def test_infinite_param_without_l2_term_stays_as_torch_leaves_it(name, weight_decay):
    """Without Adam's L2 term the param never enters the grad: torch keeps a -inf entry (e.g. a
    masked logit bias) at -inf with finite state, and so must fastopt (0 * inf is NaN)."""
    start = torch.tensor([0.5, float("-inf"), 1.0, float("inf")])
    ref_params = [start.clone().requires_grad_()]
    fast_params = [start.clone().requires_grad_()]
    ref, fast = optimizer_pair(name, ref_params, fast_params, lr=0.01, weight_decay=weight_decay)
    gen = generator(10)
    for step in range(3):
        step_and_compare(ref, fast, ref_params, fast_params, gen, 1, first=step)
        assert ref_params[0][1] == float("-inf") and ref_params[0][3] == float("inf")


def test_closure_is_called_and_its_loss_returned():
    ref_params, fast_params = make_param_pairs([(5,)], seed=8)
    ref, fast = optimizer_pair("Adam", ref_params, fast_params, lr=0.1)
    target = torch.randn(5, generator=generator(9))

    def closure_for(params, opt):
        def closure():
            opt.zero_grad()
            loss = (params[0] - target).square().sum()
            loss.backward()
            return loss

        return closure

    for _ in range(3):
        ref_loss = ref.step(closure_for(ref_params, ref))
        fast_loss = fast.step(closure_for(fast_params, fast))
        torch.testing.assert_close(fast_loss, ref_loss)
    assert_matches_reference(ref, fast, ref_params, fast_params, 1e-5, 1e-6)


@pytest.mark.parametrize(
    ("torch_cls", "fast_cls"),
    [
        (torch.optim.Adam, fastopt.FusedAdam),
        (torch.optim.AdamW, fastopt.FusedAdamW),
    ],
)
def test_constructor_signature_is_torchs(torch_cls, fast_cls):
    def shape(cls):
        params = inspect.signature(cls).parameters.values()
        return [(p.name, p.kind, p.default) for p in params]

    assert shape(fast_cls) == shape(torch_cls)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(foreach=True),
        dict(foreach=False),
        dict(fused=True),
        dict(fused=False),
        dict(capturable=True),
        dict(betas=(torch.tensor(0.8), torch.tensor(0.99))),
        dict(lr=torch.tensor([0.01])),
        dict(lr=torch.tensor(0.01, dtype=torch.float64)),
    ],
    ids=lambda kw: repr(kw),
)
def test_accepted_arguments_do_not_change_the_result(kwargs):
    """foreach / fused / capturable are accepted and ignored; Tensor betas work, and so does a
    Tensor lr of shape (1,) or of another float dtype than the params."""
    ref_params, fast_params = make_param_pairs([(7,), (33, 65)], seed=12)
    ref = torch.optim.Adam(
        ref_params,
        lr=0.01,
        foreach=False,
        betas=tuple(float(b) for b in kwargs.get("betas", (0.9, 0.999))),
    )
    fast = fastopt.FusedAdam(fast_params, **{"lr": 0.01, **kwargs})
    step_and_compare(ref, fast, ref_params, fast_params, generator(13), 3)


# -- low precision ---------------------------------------------------------------------------

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


def test_mixed_dtypes_in_one_group(device):
    """One group (so one kernel call) holding fp32, fp64, bf16 and fp16 params: each dtype is
    computed as it is alone, with state in the param's dtype."""
    gen = generator(31)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float32]
    shapes = [(7,), (4097,), (33, 65), (4097,), (0,)]
    starts = [
        torch.randn(s, generator=gen).to(dtype=d, device=device)
        for s, d in zip(shapes, dtypes, strict=True)
    ]
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_low_precision_step_is_the_fp32_step_rounded_once(dtype, name, amsgrad):
    """One bf16/fp16 step from a random state equals torch's fp32 step from the same (upcast)
    values, rounded once to the low precision: within one ulp of it, element by element."""
    gen = generator(41)
    n = 4 * 4097
    param = torch.randn(n, generator=gen).to(dtype)
    grad = torch.randn(n, generator=gen).to(dtype)
    state = dict(
        exp_avg=(0.1 * torch.randn(n, generator=gen)).to(dtype),
        exp_avg_sq=(0.01 * torch.rand(n, generator=gen)).to(dtype),
        max_exp_avg_sq=(0.02 * torch.rand(n, generator=gen)).to(dtype),
    )
    if not amsgrad:
        del state["max_exp_avg_sq"]
    kwargs = dict(lr=0.01, weight_decay=0.1, amsgrad=amsgrad, eps=1e-3)
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
    for key in ("param", *state):
        value = fast_param.detach() if key == "param" else fast.state[fast_param][key]
        exact = (high.detach() if key == "param" else ref.state[high][key]).to(dtype)
        assert value.dtype == dtype
        error = (value.float() - exact.float()).abs()
        assert bool((error <= ulp(exact)).all()), f"{key}: {error.max().item()}"
    assert fast.state[fast_param]["step"].item() == 4.0
