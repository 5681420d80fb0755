"""The precision options of every fused optimizer: master weights (float32 copy and the bfloat16
remainder form), bfloat16 state with stochastic rounding, and clipping inside the step, against
torch.optim (with torch.nn.utils.clip_grad_norm_) and against float32 training."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.optim_cases import OPTIMIZERS
from helpers.rng import generator
from torch import nn

import fastopt
from fastopt import functional

# Settings under which each optimizer trains the small model below in 200 steps.
TRAINING = {
    "Adam": dict(lr=1e-3),
    "AdamW": dict(lr=1e-3, weight_decay=0.01),
    "RMSprop": dict(lr=3e-4, momentum=0.5),
    "Adagrad": dict(lr=3e-3),
    "Adadelta": dict(lr=0.5),
}


def _pair(name: str):
    return getattr(fastopt, f"Fused{name}"), getattr(torch.optim, name)


def _model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).to(dtype)


def _data(seed: int = 1):
    gen = generator(seed)
    return torch.randn(256, 32, generator=gen), torch.randint(0, 10, (256,), generator=gen)


def _train(model: nn.Module, optimizer, steps: int = 200) -> None:
    x, y = _data()
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _distance(model: nn.Module, reference: nn.Module) -> float:
    squares = [
        (p.detach().double() - r.detach().double()).pow(2).sum().item()
        for p, r in zip(model.parameters(), reference.parameters(), strict=True)
    ]
    return math.sqrt(sum(squares))


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("form", [True, "remainder"], ids=["float32 master", "remainder"])
def test_master_weights_track_float32_training(name, form):
    """bfloat16 params with master weights stay at least 4x closer to float32 training than
    bfloat16 training with torch.optim does."""
    fused, reference = _pair(name)
    kwargs = TRAINING[name]
    full = _model(torch.float32)
    _train(full, reference(full.parameters(), **kwargs))
    plain = _model(torch.bfloat16)
    _train(plain, reference(plain.parameters(), **kwargs))
    mastered = _model(torch.bfloat16)
    _train(mastered, fused(mastered.parameters(), master_weights=form, **kwargs))
    assert _distance(plain, full) >= 4 * _distance(mastered, full)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_bfloat16_state_stays_close_to_float32_state(name):
    """float32 params with bfloat16 (stochastically rounded) state: the trajectory stays near the
    float32-state one, closer than bfloat16 params trained by torch.optim get."""
    fused, reference = _pair(name)
    kwargs = TRAINING[name]
    full = _model(torch.float32)
    _train(full, fused(full.parameters(), **kwargs))
    low_state = _model(torch.float32)
    opt = fused(low_state.parameters(), state_dtype=torch.bfloat16, **kwargs)
    _train(low_state, opt)
    plain = _model(torch.bfloat16)
    _train(plain, reference(plain.parameters(), **kwargs))
    state = opt.state[next(low_state.parameters())]
    assert all(v.dtype == torch.bfloat16 for k, v in state.items() if k != "step" and _is_t(v))
    assert _distance(low_state, full) < 0.25 * _distance(plain, full)


def _is_t(value) -> bool:
    return isinstance(value, torch.Tensor)


def _adagrad_sum_store(value: float, n: int, seed: int | None, device="cpu") -> torch.Tensor:
    """One Adagrad step from a zero sum with grads sqrt(value): the float32 sum is exactly
    `value` before it is stored in bfloat16."""
    param = torch.zeros(n, device=device)
    grad = torch.full((n,), math.sqrt(value), device=device)
    state = torch.zeros(n, dtype=torch.bfloat16, device=device)
    seeds = [] if seed is None else [seed]
    functional.adagrad_step_(
        [param], [grad], [state], [torch.zeros((), device=device)], lr=0.0, rounding_seeds=seeds
    )
    return state


def test_stochastic_rounding_is_unbiased():
    value = float(torch.tensor(1.0 + 0.3 * 2**-7).item())  # 0.3 of a bfloat16 step above 1
    exact = torch.tensor(math.sqrt(value), dtype=torch.float32).square().item()
    ulp = 2**-7
    stochastic = _adagrad_sum_store(value, 1 << 20, seed=7).double()
    nearest = _adagrad_sum_store(value, 1 << 20, seed=None).double()
    # Nearest rounding always goes down here; stochastic rounding goes up 30% of the time, so
    # its mean is the value (the standard error of the mean is 0.0005 of a step).
    assert abs(nearest.mean().item() - exact) > 0.25 * ulp
    assert abs(stochastic.mean().item() - exact) < 0.01 * ulp
    assert set(stochastic.unique().tolist()) == {1.0, 1.0 + ulp}


def test_stochastic_rounding_follows_the_seed():
    first = _adagrad_sum_store(1.001, 4097, seed=3)
    assert torch.equal(first, _adagrad_sum_store(1.001, 4097, seed=3))
    assert not torch.equal(first, _adagrad_sum_store(1.001, 4097, seed=4))


def test_rounding_seeds_are_saved_and_resume_identically():
    model = _model(torch.float32)
    opt = fastopt.FusedAdamW(model.parameters(), lr=1e-3, state_dtype=torch.bfloat16)
    _train(model, opt, steps=3)
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(model, opt, steps=3)
    resumed = _model(torch.float32, seed=5)
    resumed.load_state_dict(saved_model)
    opt2 = fastopt.FusedAdamW(resumed.parameters(), lr=1e-3, state_dtype=torch.bfloat16)
    opt2.load_state_dict(saved_opt)
    _train(resumed, opt2, steps=3)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_remainder_holds_the_float32_master_exactly():
    """The remainder form and a float32 master give the same params and the same master."""
    gen = generator(3)
    start = torch.randn(10_001, generator=gen).bfloat16()
    params = [start.clone(), start.clone()]
    masters = [torch.zeros(10_001, dtype=torch.int16), start.float()]
    states = [[torch.zeros(10_001) for _ in range(2)] for _ in range(2)]
    for step in range(5):
        grad = torch.randn(10_001, generator=gen).bfloat16()
        for p, m, (exp_avg, exp_avg_sq) in zip(params, masters, states, strict=True):
            functional.adam_step_(
                [p], [grad], [exp_avg], [exp_avg_sq], [], [torch.tensor(float(step))],
                lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, masters=[m],
            )  # fmt: skip
    joined = (params[0].view(torch.int16).int() << 16) + masters[0].int()
    assert torch.equal(joined.view(torch.float32), masters[1])
    assert torch.equal(params[0], params[1])
    assert torch.equal(params[1], masters[1].bfloat16())


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
def test_clipping_matches_clip_grad_norm_then_torch(name, norm_type):
    """float64: the fused clip and step against clip_grad_norm_ + torch.optim, norm included."""
    fused, reference = _pair(name)
    kwargs = TRAINING[name]
    models = [_model(torch.float64), _model(torch.float64)]
    fast = fused(models[0].parameters(), max_grad_norm=0.05, norm_type=norm_type, **kwargs)
    torch_opt = reference(models[1].parameters(), **kwargs)
    x, y = _data()
    for _ in range(10):
        for model in models:
            model.zero_grad()
            nn.functional.cross_entropy(model(x.double()), y).backward()
        grads_before = [p.grad.clone() for p in models[0].parameters()]
        expected = nn.utils.clip_grad_norm_(models[1].parameters(), 0.05, norm_type)
        torch_opt.step()
        norm = fast.step()
        assert norm.dtype == torch.float64 and norm is fast.grad_norm
        torch.testing.assert_close(norm, expected, rtol=1e-12, atol=0)
        for p, before in zip(models[0].parameters(), grads_before, strict=True):
            assert torch.equal(p.grad, before)  # the step clips inside; the grads stay
    for p, r in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-10)


def test_groups_that_clip_take_the_norm_of_their_own_grads():
    """float64: a group with max_grad_norm and one without (None: not clipped): the norm is
    over the clipped group's grads, as clip_grad_norm_ over its params alone takes it, and
    the other group steps unclipped."""
    models = [_model(torch.float64), _model(torch.float64)]
    groups = [
        [dict(params=m[0].parameters(), max_grad_norm=0.05), dict(params=m[2].parameters())]
        for m in models
    ]
    groups[0][1]["max_grad_norm"] = None
    fast = fastopt.FusedAdamW(groups[0], lr=1e-2)
    torch_opt = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k == "params"} for g in groups[1]], lr=1e-2
    )
    x, y = _data()
    for _ in range(5):
        for model in models:
            model.zero_grad()
            nn.functional.cross_entropy(model(x.double()), y).backward()
        expected = nn.utils.clip_grad_norm_(models[1][0].parameters(), 0.05)
        torch_opt.step()
        torch.testing.assert_close(fast.step(), expected, rtol=1e-12, atol=0)
    for p, r in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-10)


def test_clipping_with_a_closure_returns_the_loss():
    model = _model(torch.float32)
    opt = fastopt.FusedAdam(model.parameters(), lr=1e-3, max_grad_norm=1.0)
    x, y = _data()

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.dim() == 0 and loss.requires_grad
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(opt.grad_norm, expected)


def test_mixed_dtypes_in_one_group():
    """fp32, fp64, bf16 and fp16 params in one group with master weights and clipping: each
    matches its own float64 reference (16-bit ones through their master copies)."""
    gen = generator(4)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    starts = [torch.randn(257, generator=gen).to(d) for d in dtypes]
    params = [nn.Parameter(s.clone()) for s in starts]
    twins = [nn.Parameter(s.double()) for s in starts]
    opt = fastopt.FusedAdamW(params, lr=1e-2, master_weights=True, max_grad_norm=1.0)
    reference = torch.optim.AdamW(twins, lr=1e-2)
    for _ in range(5):
        for p, t in zip(params, twins, strict=True):
            grad = torch.randn(257, generator=gen)
            p.grad, t.grad = grad.to(p.dtype), grad.to(p.dtype).double()
        nn.utils.clip_grad_norm_(twins, 1.0)
        reference.step()
        opt.step()
    for p, t in zip(params, twins, strict=True):
        state = opt.state[p]
        value = state.get("master_param", p)
        tolerance = 1e-12 if p.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(value.double(), t.detach(), rtol=0, atol=tolerance)
        if "master_param" in state:
            assert torch.equal(p, state["master_param"].to(p.dtype))
    assert set(opt.state[params[2]]) == {"step", "exp_avg", "exp_avg_sq", "master_param"}
    assert "master_param" not in opt.state[params[0]]


@pytest.mark.parametrize("master_weights", [True, "remainder"])
def test_grad_scaler_inf_step_changes_nothing(master_weights):
    model = _model(torch.bfloat16)
    opt = fastopt.FusedAdamW(
        model.parameters(), lr=1e-3, master_weights=master_weights,
        state_dtype=torch.bfloat16, max_grad_norm=1.0,
    )  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x, y = _data()

    def step(inject_inf: bool):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x.bfloat16()).float(), y)
        scaler.scale(loss).backward()
        if inject_inf:
            next(model.parameters()).grad[0, 0] = math.inf
        result = scaler.step(opt)
        scaler.update()
        return result

    norm = step(False)
    assert norm is not None and torch.isfinite(norm)
    before = {p: {k: _copy(v) for k, v in opt.state[p].items()} for p in model.parameters()}
    params_before = [p.detach().clone() for p in model.parameters()]
    step(True)
    assert scaler.get_scale() == 512.0
    for p, old in zip(model.parameters(), params_before, strict=True):
        assert torch.equal(p, old)
        for key, value in before[p].items():
            assert _equal(opt.state[p][key], value)


def _copy(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def _equal(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_grad_scaler_unscales_before_the_norm():
    """Under GradScaler the norm is of the unscaled grads and clipping acts on those."""
    models = [_model(torch.float32), _model(torch.float32)]
    fast = fastopt.FusedAdam(models[0].parameters(), lr=1e-2, max_grad_norm=0.1)
    reference = torch.optim.Adam(models[1].parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x, y = _data()
    for model in models:
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(reference)
    expected = nn.utils.clip_grad_norm_(models[1].parameters(), 0.1)
    reference.step()
    norm = scaler.step(fast)
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for p, r in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)


# torch.optim.Adagrad's sparse path builds sparse tensors without its invariant checks, and says so.
@pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")
def test_clipping_with_sparse_grads_matches_torch():
    """FusedAdagrad with an nn.Embedding(sparse=True): the norm counts each sparse grad's
    coalesced values (duplicate indices summed first, as the update sums them); the sparse rows
    are clipped in the sparse step, whose scale is a float32 tensor (as GradScaler's is): the clip
    coefficient of sparse grads is rounded to float32, hence float32 tolerances here."""
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        embedding = nn.Embedding(50, 4, sparse=True).double()
        head = nn.Linear(4, 3).double()
        params = [*embedding.parameters(), *head.parameters()]
        if fused:
            opt = fastopt.FusedAdagrad(params, lr=0.1, max_grad_norm=0.5)
        else:
            opt = torch.optim.Adagrad(params, lr=0.1)
        norms = []
        for step in range(3):
            indices = torch.tensor([[1, 5, 5, 7], [2, 2, 9, step]])
            head(embedding(indices)).square().sum().backward()
            if fused:
                norms.append(opt.step())
            else:
                embedding.weight.grad = embedding.weight.grad.coalesce()
                norms.append(nn.utils.clip_grad_norm_(params, 0.5))
                opt.step()
            opt.zero_grad()
        runs.append((params, norms))
    (expected, expected_norms), (actual, actual_norms) = runs
    torch.testing.assert_close(actual_norms, expected_norms, rtol=1e-7, atol=0)
    for p, r in zip(actual, expected, strict=True):
        torch.testing.assert_close(p, r, rtol=0, atol=1e-7)
