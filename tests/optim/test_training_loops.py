"""The precision options in a bfloat16 training loop as users write it: the step compiled with
torch.compile from the very first step (before any state exists), param groups added with their
own options, and checkpoints of an earlier fastopt."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers.optim_cases import OPTIMIZERS
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fastopt

# Options that reach every precision path at once: master copies (remainders for the bfloat16
# params), bfloat16 state with its rounding seeds, clipping.
PRECISION = dict(master_weights="remainder", state_dtype=torch.bfloat16, max_grad_norm=0.05)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4)).bfloat16()


def _backward(model: nn.Module, step: int) -> None:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(5, 8, generator=gen).to(next(model.parameters()).dtype)
    model(x).float().square().mean().backward()


def _optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    torch.manual_seed(1)  # the rounding seeds: alike for both runs
    return getattr(fastopt, f"Fused{name}")(model.parameters(), lr=1e-2, **PRECISION)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_from_the_first_step_matches_eager(name):
    """torch.compile(opt.step, fullgraph=True) called before any step: the state (master
    remainders, bfloat16 moments, rounding seeds) is created while tracing. The run must be the
    eager run bit for bit, returned norms and seeds included."""
    torch._dynamo.reset()
    eager_model, model = _model(), _model()
    eager, opt = _optimizer(name, eager_model), _optimizer(name, model)
    torch.manual_seed(2)
    counter = CompileCounterWithBackend("inductor")
    compiled_step = torch.compile(opt.step, fullgraph=True, backend=counter)
    for step in range(3):
        _backward(eager_model, step)
        _backward(model, step)
        torch.manual_seed(2 + step)  # each run draws what seeds it creates from the same state
        eager_norm = eager.step()
        torch.manual_seed(2 + step)
        norm = compiled_step()
        assert torch.equal(norm, eager_norm), (step, norm, eager_norm)
        eager.zero_grad()
        opt.zero_grad()
        for p, q in zip(eager_model.parameters(), model.parameters(), strict=True):
            assert torch.equal(p, q), step
            assert opt.state[q].keys() == eager.state[p].keys(), step
            for key, value in eager.state[p].items():
                other = opt.state[q][key]
                same = (
                    torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other
                )
                assert same, (step, key)
    assert counter.frame_count >= 1


@pytest.mark.parametrize(
    "options",
    [
        dict(state_dtype=torch.float16),
        dict(state_dtype="bfloat16"),
        dict(max_grad_norm=0.0),
        dict(max_grad_norm=-1.0),
        dict(master_weights="yes"),
        dict(norm_type=-2.0),
    ],
    ids=str,
)
@pytest.mark.parametrize("where", ["add_param_group", "constructor"])
def test_param_group_options_are_checked(options, where):
    """A param group's own precision options are checked as the constructor's are: a clear error
    naming the group and the option, and the optimizer as it was (not an error at the first
    step, or a bad option taken silently)."""
    model = _model()
    key = next(iter(options))
    if where == "constructor":
        groups = [{"params": model[0].parameters()}, {"params": model[3].parameters(), **options}]
        with pytest.raises(ValueError, match=rf"FusedAdamW: param_groups\[1\]: {key} must be"):
            fastopt.FusedAdamW(groups, lr=1e-2)
        return
    opt = fastopt.FusedAdamW(model[0].parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=rf"FusedAdamW: param_groups\[1\]: {key} must be"):
        opt.add_param_group({"params": list(model[3].parameters()), **options})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": list(model[3].parameters())})  # the params are still free
    _backward(model, 0)
    opt.step()


def test_checkpoint_of_an_earlier_fastopt_loads():
    """A state_dict as fastopt wrote it before its entries were made DCP-friendly (a torch.dtype
    state_dtype, int16 remainders) still loads and resumes identically."""
    model = _model()
    opt = _optimizer("AdamW", model)
    for step in range(2):
        _backward(model, step)
        opt.step()
        opt.zero_grad()
    earlier = copy.deepcopy(opt.state_dict())
    for group in earlier["param_groups"]:
        group["state_dtype"] = torch.bfloat16
    for state in earlier["state"].values():
        state["master_remainder"] = state["master_remainder"].view(torch.int16)
    resumed_model = copy.deepcopy(model)
    resumed = _optimizer("AdamW", resumed_model)
    resumed.load_state_dict(earlier)
    for m, o in ((model, opt), (resumed_model, resumed)):
        _backward(m, 2)
        o.step()
    for p, q in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert resumed.state[q]["master_remainder"].dtype == torch.int16
        assert torch.equal(resumed.state[q]["master_remainder"], opt.state[p]["master_remainder"])
    assert resumed.param_groups[0]["state_dtype"] == torch.bfloat16


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_through_torch_optim_and_back(name):
    """fastopt's state_dict with master copies loaded into torch.optim as it is (which the README
    allows: torch keeps the extra keys, cast to the params' dtype), torch.optim trains on, and its
    state_dict comes back into fastopt: the master copies torch carried along are behind the
    params and must not be used; the run continues as from torch's state without them."""
    model = _model()
    kwargs = dict(lr=1e-2, master_weights=True)
    opt = getattr(fastopt, f"Fused{name}")(model.parameters(), **kwargs)
    for step in range(2):
        _backward(model, step)
        opt.step()
        opt.zero_grad()
    torch_opt = getattr(torch.optim, name)(model.parameters(), lr=1e-2)
    torch_opt.load_state_dict(opt.state_dict())
    for step in range(2, 5):
        _backward(model, step)
        torch_opt.step()
        torch_opt.zero_grad()
    # Copies, as if written to disk: a state_dict holds the live step counts (torch.optim's too).
    saved = copy.deepcopy(torch_opt.state_dict())
    expected_model = copy.deepcopy(model)
    expected = getattr(fastopt, f"Fused{name}")(expected_model.parameters(), **kwargs)
    with pytest.warns(UserWarning, match="dropping the float32 master copies"):
        expected.load_state_dict(fastopt.optim.to_torch_state_dict(saved))
    resumed = getattr(fastopt, f"Fused{name}")(model.parameters(), **kwargs)
    with pytest.warns(UserWarning, match="made again from the params"):
        resumed.load_state_dict(copy.deepcopy(saved))
    for m, o in ((expected_model, expected), (model, resumed)):
        _backward(m, 5)
        o.step()
    for p, q in zip(expected_model.parameters(), model.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(expected.state[p]["master_param"], resumed.state[q]["master_param"])


def test_bfloat16_state_for_float16_params_needs_master_weights():
    """float16 params take bfloat16 state only with master copies (the kernels refuse it
    otherwise): refused when the group is made, naming the fix, rather than at the first step."""
    model = _model().half()
    with pytest.raises(ValueError, match=r"param_groups\[0\] has float16 params and no master"):
        fastopt.FusedAdamW(model.parameters(), state_dtype=torch.bfloat16)
    opt = fastopt.FusedAdamW(model.parameters(), state_dtype=torch.bfloat16, master_weights=True)
    _backward(model, 0)
    opt.step()
    assert opt.state[model[0].weight]["exp_avg"].dtype == torch.bfloat16
