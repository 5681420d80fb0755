"""Every fused optimizer against torch.optim.*(foreach=False) beyond the option grids of
test_adam_reference.py and test_rmsprop_adagrad_adadelta_reference.py: thread splits inside
tensors, params at offsets into a shared buffer, non-finite grads and params, closures, the
constructor signature, arguments accepted and ignored, a model of 1200 small params, and a
bf16 / fp16 step that is the fp32 step rounded once (under every CPU instruction set)."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers.against_torch import run_against_torch
from helpers.optim_cases import OPTIMIZERS, RICH
from helpers.optim_compare import assert_matches_reference, state_keys, step_and_compare
from helpers.optim_pairs import make_param_pairs, optimizer_pair, set_grads
from helpers.rng import generator
from helpers.tolerances import FP32, ulp

import fastopt


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_many_threads_split_tensors_mid_way(name):
    """Enough elements that several threads share the work, with thread boundaries falling
    inside tensors, around empty ones."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, previous))
    try:
        shapes = [(40000,), (7,), (0,), (30001,), (1,), (123, 101), (0,)]
        run_against_torch(name, torch.float32, dict(RICH[name]), seed=3, steps=4, shapes=shapes)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_params_at_offsets_into_a_shared_buffer(name):
    gen = generator(11)
    buffer = torch.randn(1 + 7 + 4097 + 2, generator=gen)
    views = [buffer[1:8].view(7), buffer[8 : 8 + 4097], buffer[-1:]]
    ref_params = [v.clone().requires_grad_() for v in views]
    fast_params = [v.detach().requires_grad_() for v in views]  # leaves that share `buffer`
    assert fast_params[0].storage_offset() == 1
    ref, fast = optimizer_pair(name, ref_params, fast_params, **RICH[name])
    step_and_compare(ref, fast, ref_params, fast_params, gen, 6)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_nan_and_inf_grads_propagate_like_torch(name):
    """Without a GradScaler, a non-finite grad poisons the param and state as it does in torch."""
    ref_params, fast_params = make_param_pairs([(9,), (4097,)], seed=5)
    ref, fast = optimizer_pair(name, ref_params, fast_params, **RICH[name])
    gen = generator(6)
    for step in range(3):
        set_grads(gen, ref_params, fast_params)
        if step == 1:
            for params in (ref_params, fast_params):
                params[0].grad[2] = float("nan")
                params[1].grad[5] = float("inf")
                params[1].grad[6] = float("-inf")
        ref.step()
        fast.step()
        for i, (r, f) in enumerate(zip(ref_params, fast_params, strict=True)):
            where = f"step {step} param {i}"
            torch.testing.assert_close(f, r, **FP32, equal_nan=True, msg=where)
            assert set(fast.state[f]) == set(ref.state[r]), where
            for key in state_keys(name, RICH[name]):
                torch.testing.assert_close(
                    fast.state[f][key], ref.state[r][key], **FP32, equal_nan=True, msg=where
                )
    assert fast_params[0][2].isnan() and fast_params[1][5].isnan()


# Without weight decay, and AdamW's decoupled weight decay (which scales the param, never
# adding it to the grad).
INFINITE_PARAM_CASES = [
    *(pytest.param(name, {**RICH[name], "weight_decay": 0.0}, id=name) for name in OPTIMIZERS),
    pytest.param("AdamW", dict(lr=0.01, weight_decay=0.01), id="AdamW-decoupled-wd"),
]


@pytest.mark.parametrize(("name", "options"), INFINITE_PARAM_CASES)
def test_infinite_param_without_l2_term_stays_as_torch_leaves_it(name, options):
    """Without an L2 term the param never enters the grad: torch keeps a -inf entry (e.g. a
    masked logit bias) at -inf with finite state, and so must fastopt (0 * inf is NaN)."""
    start = torch.tensor([0.5, float("-inf"), 1.0, float("inf")])
    ref_params = [start.clone().requires_grad_()]
    fast_params = [start.clone().requires_grad_()]
    ref, fast = optimizer_pair(name, ref_params, fast_params, **options)
    gen = generator(10)
    for step in range(3):
        step_and_compare(ref, fast, ref_params, fast_params, gen, 1, first=step)
        assert ref_params[0][1] == float("-inf") and ref_params[0][3] == float("inf")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_closure_is_called_and_its_loss_returned(name):
    ref_params, fast_params = make_param_pairs([(5,)], seed=8)
    ref, fast = optimizer_pair(name, ref_params, fast_params, **RICH[name])
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
    assert_matches_reference(ref, fast, ref_params, fast_params, **FP32)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_constructor_signature_is_torchs(name):
    def shape(cls):
        params = inspect.signature(cls).parameters.values()
        return [(p.name, p.kind, p.default) for p in params]

    assert shape(getattr(fastopt, f"Fused{name}")) == shape(getattr(torch.optim, name))


def _accepted(name: str) -> list[dict]:
    """The arguments of torch.optim.`name` that fastopt accepts and ignores, Tensor lrs of
    shape (1,) and of another float dtype than the params, and (Adam) Tensor betas."""
    parameters = inspect.signature(getattr(torch.optim, name)).parameters
    flags = [a for a in ("foreach", "fused", "capturable") if a in parameters]
    betas = [dict(betas=(torch.tensor(0.8), torch.tensor(0.99)))] if "betas" in parameters else []
    return (
        [dict(**{a: v}) for a in flags for v in (False, True)]
        + betas
        + [
            dict(lr=torch.tensor([0.01])),
            dict(lr=torch.tensor(0.01, dtype=torch.float64)),
        ]
    )


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [(name, kwargs) for name in OPTIMIZERS for kwargs in _accepted(name)],
    ids=lambda v: v if isinstance(v, str) else repr(v),
)
def test_accepted_arguments_do_not_change_the_result(name, kwargs):
    """foreach / fused / capturable are accepted and ignored; Tensor betas work, and so does a
    Tensor lr of shape (1,) or of another float dtype than the params."""
    ref_params, fast_params = make_param_pairs([(7,), (33, 65)], seed=12)
    options = {**RICH[name], "lr": 0.01, **kwargs}
    ref_options = {k: v for k, v in options.items() if k not in kwargs or k == "betas"}
    ref_options["lr"] = 0.01
    if "betas" in ref_options:
        ref_options["betas"] = tuple(float(b) for b in ref_options["betas"])
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **ref_options)
    fast = getattr(fastopt, f"Fused{name}")(fast_params, **options)
    step_and_compare(ref, fast, ref_params, fast_params, generator(13), 3)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_model_of_1200_small_params(device, name):
    """Many small tensors of assorted sizes in one group, against torch, flattened per step."""
    gen = generator(21)
    sizes = torch.randint(0, 300, (1200,), generator=gen).tolist()
    shapes = [(s,) if i % 3 else (max(1, s // 7), 7) for i, s in enumerate(sizes)]
    ref_params, fast_params = make_param_pairs(shapes, device=device, seed=22)
    ref, fast = optimizer_pair(name, ref_params, fast_params, **RICH[name])
    for step in range(4):
        step_and_compare(ref, fast, ref_params, fast_params, gen, 1, first=step, flat=True)
        steps = torch.stack([fast.state[p]["step"] for p in fast_params])
        assert torch.all(steps == step + 1)


# -- low precision: one rounding per element --------------------------------------------------


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
@pytest.mark.parametrize("name", ["RMSprop", "Adagrad", "Adadelta"])
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
