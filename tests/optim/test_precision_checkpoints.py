"""Checkpoints and bad input of the precision options: state_dicts round trip with master copies
and low-precision state, and move between fastopt and torch.optim both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.rng import generator
from torch import nn

import fastopt
from fastopt import functional


def _model(dtype=torch.bfloat16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4)).to(dtype)


def _train(model: nn.Module, optimizer, steps: int, seed: int = 1) -> None:
    gen = generator(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(64, 16, generator=gen).to(dtype)
        loss = model(x).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


OPTIONS = [
    pytest.param(dict(master_weights=True), id="master"),
    pytest.param(dict(master_weights="remainder", state_dtype=torch.bfloat16), id="remainder"),
    pytest.param(dict(state_dtype=torch.float32, max_grad_norm=0.5), id="fp32-state-clip"),
]


@pytest.mark.parametrize("options", OPTIONS)
def test_round_trip_resumes_identically(options):
    model = _model()
    opt = fastopt.FusedAdamW(model.parameters(), lr=1e-2, **options)
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3, seed=2)

    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = fastopt.FusedAdamW(resumed.parameters(), lr=1e-2, **options)
    opt2.load_state_dict(saved_opt)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        for key, value in opt2.state[q].items():
            if isinstance(value, torch.Tensor):  # kept in its own dtype, not cast to the param's
                assert value.dtype == opt.state[p][key].dtype, key
    _train(resumed, opt2, 3, seed=2)
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


def test_torch_checkpoint_loads_with_master_weights():
    """A torch.optim state_dict: the master copies are made from the params, the state is
    converted to float32, and training goes on."""
    model = _model()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, torch_opt, 3)
    opt = fastopt.FusedAdamW(model.parameters(), lr=1e-2, master_weights=True)
    opt.load_state_dict(torch_opt.state_dict())
    p = next(model.parameters())
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt.state[p]["exp_avg"], torch_opt.state[p]["exp_avg"].float())
    assert opt.param_groups[0]["master_weights"] is True  # the optimizer's own option
    before = p.detach().float().clone()
    _train(model, opt, 1)
    assert torch.equal(opt.state[p]["master_param"].bfloat16(), p)
    assert not torch.equal(opt.state[p]["master_param"], before)


@pytest.mark.parametrize("master_weights", [True, "remainder"])
def test_fastopt_checkpoint_loads_into_torch(master_weights):
    model = _model()
    opt = fastopt.FusedAdamW(model.parameters(), lr=1e-2, master_weights=master_weights)
    _train(model, opt, 3)
    with pytest.warns(UserWarning, match="dropping the float32 master copies"):
        state_dict = fastopt.optim.to_torch_state_dict(opt.state_dict())
    for state in state_dict["state"].values():
        assert set(state) == {"step", "exp_avg", "exp_avg_sq"}
    assert "master_weights" not in state_dict["param_groups"][0]
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch_opt.load_state_dict(state_dict)
    p = next(model.parameters())
    assert torch.equal(torch_opt.state[p]["exp_avg"], opt.state[p]["exp_avg"].bfloat16())
    _train(model, torch_opt, 2)
    # As it is, the state_dict loads too: torch.optim ignores fastopt's own entries.
    torch.optim.AdamW(model.parameters(), lr=1e-2).load_state_dict(opt.state_dict())


def test_bad_options_are_refused_naming_the_option():
    params = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=r"master_weights=True but param_groups\[0\] has no"):
        fastopt.FusedAdam(params, master_weights=True)
    with pytest.raises(ValueError, match="master_weights must be"):
        fastopt.FusedAdam(params, master_weights="fp32")
    with pytest.raises(ValueError, match="state_dtype must be"):
        fastopt.FusedAdam(params, state_dtype=torch.int8)
    with pytest.raises(ValueError, match="state_dtype must be"):
        fastopt.FusedRMSprop(params, state_dtype=torch.float16)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_grad_norm must be a positive finite"):
            fastopt.FusedAdagrad(params, max_grad_norm=bad)
    with pytest.raises(ValueError, match="norm_type must be"):
        fastopt.FusedAdadelta(params, max_grad_norm=1.0, norm_type=0)


def test_master_weights_group_added_later_is_checked():
    opt = fastopt.FusedAdam([nn.Parameter(torch.randn(3).bfloat16())], master_weights=True)
    with pytest.raises(ValueError, match=r"param_groups\[1\] has no float16"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3))]})
    assert len(opt.param_groups) == 1


def test_bad_functional_input_changes_nothing():
    param, grad = torch.randn(5), torch.randn(5)
    state_sum, step = torch.zeros(5), torch.zeros(())
    before = [t.clone() for t in (param, grad, state_sum, step)]
    with pytest.raises(RuntimeError, match=r"masters\[0\] is given but params\[0\] is Float"):
        functional.adagrad_step_([param], [grad], [state_sum], [step], lr=0.1, masters=[param])
    half = torch.randn(5).half()
    with pytest.raises(RuntimeError, match=r"masters\[0\] has dtype Short"):
        functional.adagrad_step_(
            [half], [half.clone()], [torch.zeros(5)], [step], lr=0.1,
            masters=[torch.zeros(5, dtype=torch.int16)],
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="float16 one with a master copy"):
        functional.adagrad_step_(
            [half], [half.clone()], [torch.zeros(5, dtype=torch.bfloat16)], [step], lr=0.1
        )
    with pytest.raises(RuntimeError, match="max_grad_norm must be a positive finite"):
        functional.adagrad_step_(
            [param], [grad], [state_sum], [step], lr=0.1, grad_norm=torch.ones(()),
            max_grad_norm=-1.0,
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="rounding_seeds has 2 entries"):
        functional.adagrad_step_(
            [param], [grad], [state_sum], [step], lr=0.1, rounding_seeds=[1, 2]
        )
    for t, b in zip((param, grad, state_sum, step), before, strict=True):
        assert torch.equal(t, b)
