"""Every fused optimizer against torch.optim.*(foreach=False) beyond the option grids of
test_reference.py: thread splits inside tensors, params at offsets into a shared buffer,
non-finite grads and params, closures, the constructor signature, arguments accepted and
ignored, and a model of 1200 small params."""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers.against_torch import run_against_torch
from helpers.optim_cases import OPTIMIZERS, RICH
from helpers.optim_compare import assert_matches_reference, state_keys, step_and_compare
from helpers.optim_pairs import make_param_pairs, optimizer_pair, set_grads
from helpers.rng import generator
from helpers.tolerances import FP32

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


# fastopt's own keyword arguments, after all of torch's (fastopt.optim._precision).
PRECISION_ARGUMENTS = [
    ("master_weights", inspect.Parameter.KEYWORD_ONLY, False),
    ("state_dtype", inspect.Parameter.KEYWORD_ONLY, None),
    ("max_grad_norm", inspect.Parameter.KEYWORD_ONLY, None),
    ("norm_type", inspect.Parameter.KEYWORD_ONLY, 2.0),
]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_constructor_signature_is_torchs(name):
    """torch's arguments, in torch's order and kinds, with torch's defaults; then fastopt's."""

    def shape(cls):
        params = inspect.signature(cls).parameters.values()
        return [(p.name, p.kind, p.default) for p in params]

    expected = shape(getattr(torch.optim, name)) + PRECISION_ARGUMENTS
    assert shape(getattr(fastopt, f"Fused{name}")) == expected


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
