"""FusedOptimizer._states_of: the quick path for complete plain state (every step after the first)
hands the kernels the same tensors, in the same order, as the general path that creates state."""

import pytest
import torch

import fastopt


def _params(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for n in sizes:
        p = torch.nn.Parameter(torch.randn(n, generator=gen))
        p.grad = torch.randn(n, generator=gen)
        params.append(p)
    return params


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: fastopt.FusedAdam(ps, lr=1e-2),
        lambda ps: fastopt.FusedAdagrad(ps),
        lambda ps: fastopt.FusedRMSprop(ps, momentum=0.9, centered=True),
        lambda ps: fastopt.FusedAdadelta(ps),
    ],
)
def test_complete_state_is_gathered_per_key_in_param_order(make):
    params = _params([5, 1, 33, 7])
    opt = make(params)
    opt.step()
    group = opt.param_groups[0]
    states, created = opt._states_of(group["params"], group)
    assert created == []
    keys = ("step", *opt._state_keys(group))
    assert set(states) == {*keys, "master", "rounding_seed"}
    for key in keys:
        assert all(a is opt.state[p][key] for a, p in zip(states[key], params, strict=True))
    assert states["master"] == (None,) * 4 and states["rounding_seed"] == (None,) * 4


def test_params_without_state_among_complete_ones_get_state_created():
    params = _params([6, 9, 4])
    opt = fastopt.FusedAdam(params[:2], lr=1e-2)
    opt.step()
    group = opt.param_groups[0]
    group["params"].append(params[2])
    states, created = opt._states_of(group["params"], group)
    assert created == [params[2]]
    assert torch.equal(states["exp_avg"][2], torch.zeros(4))
    assert states["step"][2].item() == 0
    assert all(
        a is opt.state[p]["exp_avg_sq"] for a, p in zip(states["exp_avg_sq"], params, strict=True)
    )


def test_amsgrad_switched_on_after_steps_creates_its_state_and_matches_torch():
    params = _params([10, 3])
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(reference, params, strict=True):
        r.grad = p.grad.clone()
    opt = fastopt.FusedAdam(params, lr=1e-2)
    ref = torch.optim.Adam(reference, lr=1e-2, foreach=False)
    opt.step()
    ref.step()
    opt.param_groups[0]["amsgrad"] = ref.param_groups[0]["amsgrad"] = True
    for r in reference:  # torch creates max_exp_avg_sq only with new state: give it zeros
        ref.state[r]["max_exp_avg_sq"] = torch.zeros_like(r)
    opt.step()
    ref.step()
    for p, r in zip(params, reference, strict=True):
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
        torch.testing.assert_close(p, r)
        torch.testing.assert_close(opt.state[p]["max_exp_avg_sq"], ref.state[r]["max_exp_avg_sq"])


def test_plain_group_with_a_state_key_of_another_name_fails_as_before():
    params = _params([4])
    opt = fastopt.FusedAdagrad(params)
    opt.step()
    state = opt.state[params[0]]
    state["other"] = state.pop("sum")  # same count of keys, a wrong name
    group = opt.param_groups[0]
    with pytest.raises(KeyError, match="sum"):
        opt._states_of(group["params"], group)
