"""FusedAdagrad with sparse gradients against torch.optim.Adagrad(foreach=False)'s sparse path.

Sparse COO grads, as nn.Embedding(sparse=True) makes them or by hand: uncoalesced with
duplicate (unsorted, even cancelling) indices, coalesced, hybrid (dense trailing dims), empty;
every Adagrad option that applies to them; fp32 / fp64 to rounding, bf16 / fp16 as accurate as
torch; sparse and dense grads in one group; GradScaler; and the weight_decay error, raised
before anything changes.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from helpers.against_torch import assert_error_within_torchs
from helpers.optim_compare import assert_matches_reference, scaler_step_and_compare
from helpers.optim_pairs import make_param_pairs, optimizer_pair, set_grads
from helpers.rng import generator
from helpers.snapshot import assert_unchanged, snapshot
from helpers.tolerances import FP32, TOLERANCES
from torch import Tensor, nn

import fastopt

# torch's own sparse Adagrad builds sparse tensors without asking for invariant checks.
pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")


def _coo(
    indices: list[list[int]],
    shape: tuple[int, ...],
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    coalesced: bool = False,
) -> Tensor:
    """A sparse COO grad of `shape` with the given indices (one list per sparse dim, kept in
    the order given, repeats included) and random values of shape shape[sparse_dim:]."""
    index = torch.tensor(indices, dtype=torch.long).reshape(len(indices), -1)
    values_shape = (index.shape[1], *shape[len(indices) :])
    values = torch.randn(values_shape, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.sparse_coo_tensor(
        index.to(device), values.to(device), shape, check_invariants=True
    )
    return grad.coalesce() if coalesced else grad


def _give(grad: Tensor, *params: Tensor) -> None:
    """Each param gets its own copy of `grad` (coalesced or not, as it is)."""
    for p in params:
        p.grad = grad.clone()
        assert p.grad.is_coalesced() == grad.is_coalesced()


def _assert_grads_unchanged(params: list[Tensor], grads: list[Tensor], where: str) -> None:
    """A step without a GradScaler leaves the grads as they were (torch's never touches them),
    sparse ones sparse."""
    for p, g in zip(params, grads, strict=True):
        assert p.grad.layout == g.layout, where
        torch.testing.assert_close(p.grad.to_dense(), g.to_dense(), rtol=0, atol=0, msg=where)


# The options that apply to sparse grads (weight_decay does not), on top of lr=0.1.
SPARSE_OPTIONS = [
    pytest.param(dict(), id="default"),
    pytest.param(dict(lr_decay=0.3), id="lr_decay"),
    pytest.param(dict(maximize=True), id="maximize"),
    pytest.param(dict(initial_accumulator_value=0.5), id="initial_accumulator_value"),
    pytest.param(dict(eps=1e-3), id="eps"),
    pytest.param(
        dict(lr_decay=0.1, maximize=True, initial_accumulator_value=0.2, eps=1e-6), id="all"
    ),
    pytest.param(dict(lr=torch.tensor(0.05)), id="tensor-lr"),
]


def _embedding_models(device, seed, dtype=torch.float32):
    """Equal (embedding with sparse grads -> linear) models for torch and fastopt."""
    torch.manual_seed(seed)
    ref = nn.Sequential(nn.Embedding(30, 5, sparse=True), nn.Linear(5, 3)).to(device, dtype)
    return ref, copy.deepcopy(ref)


def _backward(model, gen, device, batch=24):
    """A batch of 24 lookups into 30 rows: some rows repeat, some are missed."""
    rows = torch.randint(0, 30, (batch,), generator=gen).to(device)
    target = torch.randn(batch, 3, generator=gen).to(device)
    nn.functional.mse_loss(model(rows), target).backward()


@pytest.mark.parametrize("options", SPARSE_OPTIONS)
def test_embedding_with_repeated_indices(device, options):
    """nn.Embedding(sparse=True) and a dense layer in one group (so sparse and dense grads in
    one step), against torch after every step."""
    ref_model, fast_model = _embedding_models(device, seed=1)
    kwargs = {"lr": 0.1, **options}
    ref, fast = optimizer_pair("Adagrad", ref_model.parameters(), fast_model.parameters(), **kwargs)
    gen_ref, gen_fast = generator(2), generator(2)
    for step in range(8):
        ref.zero_grad()
        fast.zero_grad()
        _backward(ref_model, gen_ref, device)
        _backward(fast_model, gen_fast, device)
        weight = fast_model[0].weight
        assert weight.grad.is_sparse and not weight.grad.is_coalesced()
        grads = [p.grad.clone() for p in fast_model.parameters()]
        ref.step()
        fast.step()
        where = f"step {step}"
        assert_matches_reference(
            ref, fast, list(ref_model.parameters()), list(fast_model.parameters()), **FP32,
            where=where,
        )  # fmt: skip
        _assert_grads_unchanged(list(fast_model.parameters()), grads, where)


# (param shape, indices): 1 to 3 sparse dims, hybrid values of 0 to 2 dense dims; duplicates,
# unsorted; in "rows", duplicates whose values cancel (see `_hand_made_grad`).
HAND_MADE = {
    "vector": ((20,), [[3, 1, 3, 7, 1, 19, 0]]),
    "rows": ((20, 4), [[3, 1, 3, 7, 1, 19, 0, 7, 19, 19]]),
    "hybrid-3d-sparse_dim-1": ((50, 3, 4), [[49, 2, 2, 17, 0, 2]]),
    "hybrid-3d-sparse_dim-2": ((50, 3, 4), [[49, 2, 2, 17, 0, 2], [1, 0, 0, 2, 2, 1]]),
    "3d-sparse_dim-3": ((6, 3, 4), [[5, 2, 2, 0, 5], [1, 0, 0, 2, 1], [3, 0, 0, 1, 3]]),
    "matrix-sparse_dim-2": ((10, 6), [[9, 0, 9, 4], [5, 0, 5, 5]]),
    "many-duplicates": ((100, 8), None),  # 5000 random rows: ~50 entries a row
}


def _hand_made_grad(case, gen, dtype=torch.float32, device="cpu", coalesced=False):
    shape, indices = HAND_MADE[case]
    if indices is None:
        indices = [torch.randint(0, shape[0], (5000,), generator=gen).tolist()]
    grad = _coo(indices, shape, gen, dtype, device)
    if case == "rows":
        # Row 7 gets no net gradient (+v, -v), row 19 the negation of its first entry's.
        values = grad._values()
        values[7] = -values[3]
        values[8] = -values[5]
        values[9] = -values[5]
    if coalesced:
        grad = grad.coalesce()
    assert grad.is_coalesced() == coalesced
    return grad


@pytest.mark.parametrize("case", list(HAND_MADE))
@pytest.mark.parametrize("coalesced", [False, True], ids=["uncoalesced", "coalesced"])
def test_hand_made_sparse_grads(device, case, coalesced):
    _run_hand_made(case, coalesced, device)


@pytest.mark.parametrize("case", list(HAND_MADE))
def test_hand_made_sparse_grads_under_every_isa(cpu_isa, case):
    _run_hand_made(case, False, "cpu")


def _run_hand_made(case, coalesced, device):
    """5 steps with a fresh grad of `case` each, against torch after every step."""
    shape = HAND_MADE[case][0]
    ref_params, fast_params = make_param_pairs([shape], device=device, seed=3)
    kwargs = dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1)
    ref, fast = optimizer_pair("Adagrad", ref_params, fast_params, **kwargs)
    gen = generator(4)
    for step in range(5):
        grad = _hand_made_grad(case, gen, device=device, coalesced=coalesced)
        _give(grad, ref_params[0], fast_params[0])
        ref.step()
        fast.step()
        where = f"step {step}"
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=where)
        _assert_grads_unchanged(fast_params, [grad], where)


def test_rows_with_no_net_gradient_stay_as_torch_leaves_them():
    """Duplicates that cancel (row 7: +v, -v; row 19: +w, -w, -w) are summed first, as torch
    coalesces before squaring: row 7 moves by 0 and its sum does not grow."""
    ref_params, fast_params = make_param_pairs([(20, 4)], seed=5)
    ref, fast = optimizer_pair("Adagrad", ref_params, fast_params, lr=0.1)
    grad = _hand_made_grad("rows", generator(6))
    assert torch.equal(grad.to_dense()[7], torch.zeros(4))
    _give(grad, ref_params[0], fast_params[0])
    before = fast_params[0].detach().clone()
    ref.step()
    fast.step()
    assert_matches_reference(ref, fast, ref_params, fast_params, **FP32)
    assert torch.equal(fast_params[0].detach()[7], before[7])
    assert torch.equal(fast.state[fast_params[0]]["sum"][7], torch.zeros(4))


def test_empty_sparse_grad():
    """nnz=0: no row changes; the step count still advances, as in torch."""
    ref_params, fast_params = make_param_pairs([(20, 4), (7,)], seed=7)
    ref, fast = optimizer_pair("Adagrad", ref_params, fast_params, lr=0.1, lr_decay=0.5)
    gen = generator(8)
    before = [p.detach().clone() for p in fast_params]
    for step in range(3):
        for i, shape in enumerate([(20, 4), (7,)]):
            _give(_coo([[]], shape, gen), ref_params[i], fast_params[i])
        assert fast_params[0].grad._nnz() == 0
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    for p, b in zip(fast_params, before, strict=True):
        assert torch.equal(p.detach(), b)
        assert fast.state[p]["step"].item() == 3
    # A non-empty grad after the empty ones: lr_decay counts the empty steps too.
    for i, shape in enumerate([(20, 4), (7,)]):
        _give(_coo([[1, 1, 5]], shape, gen), ref_params[i], fast_params[i])
    ref.step()
    fast.step()
    assert_matches_reference(ref, fast, ref_params, fast_params, **FP32)


def test_only_the_rows_present_are_written():
    """A 2000 x 16 embedding with 64 rows looked up: every other row of the param and of its
    sum is bitwise as before; the rows present match torch."""
    gen = generator(9)
    ref_params, fast_params = make_param_pairs([(2000, 16)], seed=10)
    ref, fast = optimizer_pair("Adagrad", ref_params, fast_params, lr=0.1, eps=1e-8)
    for step in range(3):
        rows = torch.randint(0, 2000, (64,), generator=gen)
        grad = _coo([rows.tolist()], (2000, 16), gen)
        _give(grad, ref_params[0], fast_params[0])
        param_before = fast_params[0].detach().clone()
        sum_before = fast.state[fast_params[0]]["sum"].clone()
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
        untouched = torch.ones(2000, dtype=torch.bool)
        untouched[rows] = False
        assert torch.equal(fast_params[0].detach()[untouched], param_before[untouched])
        assert torch.equal(fast.state[fast_params[0]]["sum"][untouched], sum_before[untouched])


def test_fp64_matches_torch(cpu_isa):
    ref_params, fast_params = make_param_pairs([(50, 3, 4), (20,)], torch.float64, seed=11)
    ref, fast = optimizer_pair(
        "Adagrad", ref_params, fast_params, lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1
    )
    gen = generator(12)
    rtol, atol = TOLERANCES[torch.float64]
    for step in range(5):
        grad = _hand_made_grad("hybrid-3d-sparse_dim-1", gen, torch.float64)
        _give(grad, ref_params[0], fast_params[0])
        _give(_hand_made_grad("vector", gen, torch.float64), ref_params[1], fast_params[1])
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, rtol, atol, f"step {step}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["rows", "hybrid-3d-sparse_dim-1", "many-duplicates"])
def test_low_precision_error_is_within_torchs(cpu_isa, dtype, case):
    """fastopt in bf16 / fp16 is at most ~2x as far from torch's fp32 run as torch's bf16 / fp16
    run, on the params and the sums (eps=1e-3: fp16 cannot hold torch's 1e-10)."""
    shape = HAND_MADE[case][0]
    low, fast = make_param_pairs([shape], dtype, seed=13)
    high = [low[0].detach().float().requires_grad_()]
    kwargs = dict(lr=0.05, lr_decay=0.1, eps=1e-3, maximize=True)
    low_opt, fast_opt = optimizer_pair("Adagrad", low, fast, **kwargs)
    high_opt = torch.optim.Adagrad(high, foreach=False, **kwargs)
    gen = generator(14)
    for step in range(8):
        grad = _hand_made_grad(case, gen, dtype)
        _give(grad, low[0], fast[0])
        high[0].grad = grad.float()  # the same low-precision values, exactly; uncoalesced
        for opt in (low_opt, fast_opt, high_opt):
            opt.step()
        assert_error_within_torchs(fast, low, high, f"step {step} param")
        assert_error_within_torchs(
            [fast_opt.state[fast[0]]["sum"]],
            [low_opt.state[low[0]]["sum"]],
            [high_opt.state[high[0]]["sum"]],
            f"step {step} sum",
        )


def test_sparse_and_dense_grads_for_the_same_param_across_steps():
    """A param whose grad is dense one step and sparse the next (e.g. a tied embedding)."""
    ref_params, fast_params = make_param_pairs([(20, 4), (33, 65)], seed=15)
    ref, fast = optimizer_pair(
        "Adagrad", ref_params, fast_params, lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1
    )
    gen = generator(16)
    for step in range(6):
        set_grads(gen, ref_params, fast_params)
        if step % 2:
            _give(_hand_made_grad("rows", gen), ref_params[0], fast_params[0])
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")


def test_sparse_grads_in_several_groups():
    """Groups with their own lr (one a Tensor), lr_decay, eps and maximize, each holding sparse
    and dense grads; and a param without a grad, whose state stays as constructed."""
    shapes = [(20, 4), (7,), (50, 3, 4), (33, 65), (20,), (5,)]
    ref_params, fast_params = make_param_pairs(shapes, seed=17)
    settings = [
        dict(lr=0.1),
        dict(lr=torch.tensor(0.05), lr_decay=0.2, eps=1e-6),
        dict(lr=0.02, maximize=True),
    ]

    def groups(params):
        return [
            dict(
                params=params[2 * i : 2 * i + 2],
                **{k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()},
            )
            for i, s in enumerate(settings)
        ]

    ref = torch.optim.Adagrad(groups(ref_params), foreach=False, initial_accumulator_value=0.1)
    fast = fastopt.FusedAdagrad(groups(fast_params), initial_accumulator_value=0.1)
    gen = generator(18)
    for step in range(4):
        set_grads(gen, ref_params[1:4], fast_params[1:4])
        _give(_hand_made_grad("rows", gen), ref_params[0], fast_params[0])
        _give(_hand_made_grad("hybrid-3d-sparse_dim-1", gen), ref_params[2], fast_params[2])
        _give(_hand_made_grad("vector", gen), ref_params[4], fast_params[4])
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    assert fast.state[fast_params[5]]["step"].item() == 0


# -- weight_decay: torch's error, raised before anything changes -------------------------------


@pytest.mark.parametrize("position", ["only-group", "first-of-two", "second-of-two"])
def test_weight_decay_with_a_sparse_grad_is_refused_before_anything_changes(position):
    gen = generator(19)
    stale = torch.randn(5, generator=gen).requires_grad_()
    embedding = torch.randn(20, 4, generator=gen).requires_grad_()
    bad_group = dict(params=[stale, embedding], weight_decay=0.1)
    other = [torch.randn(s, generator=gen).requires_grad_() for s in [(7,), (20, 4)]]
    other_group = dict(params=other)  # weight_decay=0: its sparse grad is fine
    groups = {
        "only-group": [bad_group],
        "first-of-two": [bad_group, other_group],
        "second-of-two": [other_group, bad_group],
    }[position]
    opt = fastopt.FusedAdagrad(groups, lr=0.1)
    all_params = [stale, embedding, *(other if position != "only-group" else [])]
    # One good step first (dense grads only), so there is state that has moved.
    set_grads(gen, [stale, *all_params[2:]])
    opt.step()
    set_grads(gen, [stale])
    _give(_hand_made_grad("rows", gen), embedding)
    if position != "only-group":
        set_grads(gen, other[:1])
        _give(_hand_made_grad("rows", gen), other[1])
    before = snapshot(opt, all_params)
    with pytest.raises(RuntimeError, match="weight_decay option is not compatible with sparse"):
        opt.step()
    assert_unchanged(opt, all_params, before)


def test_weight_decay_error_is_torchs():
    p = torch.randn(20, 4).requires_grad_()
    _give(_hand_made_grad("rows", generator(20)), p)
    with pytest.raises(RuntimeError) as torch_error:
        torch.optim.Adagrad([p], weight_decay=0.1, foreach=False).step()
    with pytest.raises(RuntimeError, match=re.escape(str(torch_error.value))):
        fastopt.FusedAdagrad([p], weight_decay=0.1).step()


# -- GradScaler and the op path -----------------------------------------------------------------


@pytest.mark.parametrize("bad", [None, float("inf"), float("nan")], ids=["finite", "inf", "nan"])
def test_grad_scaler_with_sparse_grads(device, bad):
    """GradScaler around an embedding model: torch unscales the sparse grad's values before its
    step, fastopt inside its kernel, storing the values back unscaled. At step 2 an inf / NaN
    in the sparse grad (if `bad`): nothing changes, step counts included; the scale halves."""
    ref_model, fast_model = _embedding_models(device, seed=21)
    ref, fast = optimizer_pair(
        "Adagrad", ref_model.parameters(), fast_model.parameters(), lr=0.1, lr_decay=0.1
    )
    scalers = [torch.amp.GradScaler(device, 2.0**10, growth_interval=3) for _ in range(2)]
    gen_ref, gen_fast = generator(22), generator(22)
    ref_params, fast_params = list(ref_model.parameters()), list(fast_model.parameters())
    for step in range(6):
        for model, opt, scaler, gen in [
            (ref_model, ref, scalers[0], gen_ref),
            (fast_model, fast, scalers[1], gen_fast),
        ]:
            opt.zero_grad()
            rows = torch.randint(0, 30, (24,), generator=gen).to(device)
            target = torch.randn(24, 3, generator=gen).to(device)
            scaler.scale(nn.functional.mse_loss(model(rows), target)).backward()
            if step == 2 and bad is not None:
                model[0].weight.grad._values()[3, 1] = bad
        scaler_step_and_compare(
            ref, fast, ref_params, fast_params, scalers, f"step {step}",
            skipped=step == 2 and bad is not None,
        )  # fmt: skip
    expected = 5 if bad is not None else 6
    assert all(fast.state[p]["step"].item() == expected for p in fast_params)


def _functional_case(seed, device="cpu"):
    """A param, an uncoalesced hybrid grad, a positive state_sum and a step count of 3."""
    gen = generator(seed)
    param = torch.randn(50, 3, 4, generator=gen).to(device)
    grad = _hand_made_grad("hybrid-3d-sparse_dim-1", gen, device=device)
    state_sum = (torch.rand(50, 3, 4, generator=gen) + 0.1).to(device)
    return param, grad, state_sum, torch.tensor(3.0, device=device)


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale"])
def test_functional_sparse_adagrad_step_matches_torch(tensor_lr, scaled):
    param, grad, state_sum, step = _functional_case(23)
    scale = 1024.0
    ref_param = param.clone().requires_grad_()
    ref_param.grad = grad.clone()
    ref = torch.optim.Adagrad(
        [ref_param], lr=0.1, lr_decay=0.1, eps=1e-6, maximize=True, foreach=False
    )
    ref.state[ref_param] = dict(step=step.clone(), sum=state_sum.clone())
    ref.step()
    given = grad.clone()
    if scaled:
        given = torch.sparse_coo_tensor(given._indices(), given._values() * scale, given.shape)
    fastopt.functional.sparse_adagrad_step_(
        param, given, state_sum, step,
        lr=torch.tensor(0.1) if tensor_lr else 0.1, lr_decay=0.1, eps=1e-6, maximize=True,
        grad_scale=torch.tensor(scale) if scaled else None,
        found_inf=torch.tensor(0.0) if scaled else None,
    )  # fmt: skip
    torch.testing.assert_close(param, ref_param.detach(), **FP32)
    torch.testing.assert_close(state_sum, ref.state[ref_param]["sum"], **FP32)
    assert step.item() == 4.0
    # The grad's values as given, or stored back unscaled.
    torch.testing.assert_close(given.to_dense(), grad.to_dense(), rtol=0, atol=0)


def test_functional_sparse_adagrad_step_found_inf_changes_nothing():
    param, grad, state_sum, step = _functional_case(24)
    inputs = (param, grad, state_sum, step)
    copies = [t.clone() for t in inputs]
    fastopt.functional.sparse_adagrad_step_(
        *inputs, lr=0.1, grad_scale=torch.tensor(64.0), found_inf=torch.tensor(1.0)
    )
    for name, t, b in zip(["param", "grad", "state_sum", "step"], inputs, copies, strict=True):
        if t.is_sparse:
            t, b = t.to_dense(), b.to_dense()
        assert torch.equal(t, b), f"{name} changed"


# -- sparse grads in layouts autograd does not make --------------------------------------------

_ROWS = [[3, 1, 3, 7]]


def _odd_layout_grad(case: str, gen: torch.Generator) -> Tensor:
    """A hand-made (20, 4) grad with duplicates whose indices or values are laid out oddly."""
    values = torch.randn(4, 4, generator=gen)
    if case == "non-contiguous-values":
        values = values.t()
    elif case == "expanded-values":
        values = values[:1].expand(4, 4)
    indices = torch.tensor(_ROWS)
    if case == "non-contiguous-indices":
        indices = torch.tensor(_ROWS * 2)[::2]
    grad = torch.sparse_coo_tensor(indices, values, (20, 4), check_invariants=True)
    assert not grad.is_coalesced()
    return grad


@pytest.mark.parametrize(
    "case", ["non-contiguous-values", "expanded-values", "non-contiguous-indices"]
)
def test_sparse_grads_with_oddly_laid_out_indices_or_values(case):
    """torch takes any valid COO grad; so must fastopt. The odd grad sits in the second group,
    after a group with a dense and an ordinary sparse grad."""
    ref_params, fast_params = make_param_pairs([(7,), (20, 4), (20, 4)], seed=25)

    def groups(params):
        return [dict(params=params[:2]), dict(params=params[2:], lr=0.05)]

    ref = torch.optim.Adagrad(groups(ref_params), lr=0.1, foreach=False)
    fast = fastopt.FusedAdagrad(groups(fast_params), lr=0.1)
    gen = generator(26)
    for step in range(3):
        set_grads(gen, ref_params[:1], fast_params[:1])
        _give(_hand_made_grad("rows", gen), ref_params[1], fast_params[1])
        _give(_odd_layout_grad(case, gen), ref_params[2], fast_params[2])
        ref.step()
        fast.step()
        assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")


@pytest.mark.parametrize("position", ["first-of-two", "second-of-two"])
def test_sparse_grad_of_a_non_contiguous_param_is_refused_before_anything_changes(position):
    """A transposed param with a sparse grad (torch takes it; fastopt's row update needs rows
    in contiguous memory): a clear error naming the param, and no group changed."""
    gen = generator(27)
    transposed = torch.randn(4, 20, generator=gen).t().requires_grad_()
    bad_group = dict(params=[torch.randn(5, generator=gen).requires_grad_(), transposed])
    other_group = dict(params=[torch.randn(7, generator=gen).requires_grad_()])
    groups = [bad_group, other_group] if position == "first-of-two" else [other_group, bad_group]
    opt = fastopt.FusedAdagrad(groups, lr=0.1)
    params = [*bad_group["params"], *other_group["params"]]
    set_grads(gen, params)
    opt.step()
    set_grads(gen, [params[0], params[2]])
    _give(_hand_made_grad("rows", gen), transposed)
    before = snapshot(opt, params)
    index = 0 if position == "first-of-two" else 1
    with pytest.raises(RuntimeError, match=rf"param 1 of param_groups\[{index}\].*contiguous"):
        opt.step()
    assert_unchanged(opt, params, before)


# -- checkpoints, threads, dtypes ---------------------------------------------------------------


@pytest.mark.parametrize("direction", ["torch->fastopt", "fastopt->torch"])
def test_checkpoint_round_trip_with_sparse_grads(device, direction):
    """An embedding model trained with sparse grads: 3 steps with one optimizer, its state_dict
    (through torch.save / torch.load(weights_only=True)) loaded into the other, 3 more: the
    same as an uninterrupted torch run."""
    ref_model, model = _embedding_models(device, seed=28)
    kwargs = dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.1)
    reference = torch.optim.Adagrad(ref_model.parameters(), foreach=False, **kwargs)
    classes = [
        lambda params, **kw: torch.optim.Adagrad(params, foreach=False, **kw),
        fastopt.FusedAdagrad,
    ]
    first_cls, second_cls = classes if direction == "torch->fastopt" else classes[::-1]
    opt = first_cls(model.parameters(), **kwargs)
    gen_ref, gen = generator(29), generator(29)
    ref_params, params = list(ref_model.parameters()), list(model.parameters())
    for step in range(6):
        if step == 3:
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            opt = second_cls(model.parameters(), lr=0.5)
            opt.load_state_dict(torch.load(buffer, weights_only=True))
        for m, o, g in ((ref_model, reference, gen_ref), (model, opt, gen)):
            o.zero_grad()
            _backward(m, g, device)
        reference.step()
        opt.step()
        assert_matches_reference(reference, opt, ref_params, params, **FP32, where=f"{step}")


def test_many_threads_and_many_rows():
    """A 5000 x 64 embedding, 40000 looked-up rows (many duplicates, unsorted), with several
    threads sharing the row update."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(2, previous))
    try:
        gen = generator(30)
        ref_params, fast_params = make_param_pairs([(5000, 64)], seed=31)
        ref, fast = optimizer_pair("Adagrad", ref_params, fast_params, lr=0.1, lr_decay=0.01)
        for step in range(3):
            rows = torch.randint(0, 5000, (40000,), generator=gen).tolist()
            _give(_coo([rows], (5000, 64), gen), ref_params[0], fast_params[0])
            ref.step()
            fast.step()
            assert_matches_reference(ref, fast, ref_params, fast_params, **FP32, where=f"{step}")
    finally:
        torch.set_num_threads(previous)


def test_sparse_and_dense_grads_of_mixed_dtypes_in_one_group():
    """A bf16 embedding (sparse grads), an fp64 one, and fp32 / fp16 dense params in one group:
    the fp32 / fp64 ones match torch; the bf16 / fp16 ones are as accurate as torch's run in
    their precision, measured against an fp32 one."""
    gen = generator(32)
    shapes = [(30, 5), (30, 5), (7,), (4097,)]
    dtypes = [torch.bfloat16, torch.float64, torch.float32, torch.float16]
    starts = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes, strict=True)]
    kwargs = dict(lr=0.05, lr_decay=0.1, eps=1e-3)
    fast = [s.clone().requires_grad_() for s in starts]
    low = [s.clone().requires_grad_() for s in starts]  # torch in each param's own dtype
    high = [s.float().requires_grad_() for s in starts]  # torch in fp32
    opts = [fastopt.FusedAdagrad(fast, **kwargs)] + [
        torch.optim.Adagrad(ps, foreach=False, **kwargs) for ps in (low, high)
    ]
    for step in range(5):
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes, strict=True)):
            if i < 2:
                rows = torch.randint(0, 30, (12,), generator=gen).tolist()
                grad = _coo([rows], shape, gen, dtype)
            else:
                grad = torch.randn(shape, generator=gen).to(dtype)
            fast[i].grad, low[i].grad, high[i].grad = grad.clone(), grad.clone(), grad.float()
        for opt in opts:
            opt.step()
        where = f"step {step}"
        for i in (1, 2):
            rtol, atol = TOLERANCES[dtypes[i]]
            torch.testing.assert_close(fast[i], low[i], rtol=rtol, atol=atol, msg=where)
        for i in (0, 3):
            assert_error_within_torchs([fast[i]], [low[i]], [high[i]], f"{where} param {i}")
            assert_error_within_torchs(
                [opts[0].state[fast[i]]["sum"]],
                [opts[1].state[low[i]]["sum"]],
                [opts[2].state[high[i]]["sum"]],
                f"{where} sum {i}",
            )


@pytest.mark.parametrize("bad_first", [False, True], ids=["sparse-then-bad", "bad-then-sparse"])
def test_bad_state_next_to_a_sparse_grad_changes_nothing(bad_first):
    """One group, so no check-only pass before it: a dense param whose loaded state has the
    wrong shape (caught only by the op's checks) next to a param with a sparse grad; neither
    may change, whichever comes first."""
    gen = generator(33)
    embedding = torch.randn(20, 4, generator=gen).requires_grad_()
    dense = torch.randn(6, generator=gen).requires_grad_()
    params = [dense, embedding] if bad_first else [embedding, dense]
    opt = fastopt.FusedAdagrad(params, lr=0.1)
    set_grads(gen, params)
    opt.step()
    opt.state[dense]["sum"] = torch.zeros(5)
    set_grads(gen, [dense])
    _give(_hand_made_grad("rows", gen), embedding)
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"state_sums\[0\]"):
        opt.step()
    assert_unchanged(opt, params, before)


def test_a_lone_sparse_grad_with_bad_state_changes_nothing():
    """A group whose only op is one sparse step runs no check-only pass first: the op must check
    everything before it writes. A loaded sum of the wrong shape: a clear error, nothing changed."""
    gen = generator(34)
    embedding = torch.randn(20, 4, generator=gen).requires_grad_()
    opt = fastopt.FusedAdagrad([embedding], lr=0.1)
    _give(_hand_made_grad("rows", gen), embedding)
    opt.step()
    opt.state[embedding]["sum"] = torch.zeros(20, 3)
    _give(_hand_made_grad("rows", gen), embedding)
    before = snapshot(opt, [embedding])
    with pytest.raises(RuntimeError, match=r"state_sum"):
        opt.step()
    assert_unchanged(opt, [embedding], before)


# (param shape, indices, the out-of-bounds index, its dimension): torch.sparse_coo_tensor checks
# no bounds by default. In the last case the row-major row (2 * 3 + 3 = 9) is inside the param.
OUTSIDE = {
    "past-the-end": ((20, 4), [[3, 20, 5]], 20, 0),
    "negative": ((20, 4), [[3, -1, 5]], -1, 0),
    "second-sparse-dim": ((50, 3, 4), [[1, 2, 0], [0, 3, 1]], 3, 1),
}


@pytest.mark.parametrize("case", list(OUTSIDE))
def test_an_index_outside_the_param_is_refused_before_anything_changes(device, case):
    """torch's Adagrad raises an IndexError for such an entry; fastopt must too, rather than
    write outside the param (or into the wrong row)."""
    shape, indices, outside, dim = OUTSIDE[case]
    gen = generator(35)
    param = torch.randn(shape, generator=gen).to(device).requires_grad_()
    opt = fastopt.FusedAdagrad([param], lr=0.1)
    values = torch.randn(len(indices[0]), *shape[len(indices) :], generator=gen)
    outside_grad = torch.sparse_coo_tensor(
        torch.tensor(indices), values, shape, check_invariants=False
    )
    param.grad = outside_grad.to(device)
    before = snapshot(opt, [param])
    with pytest.raises(IndexError, match=rf"index {outside} of dimension {dim}, out of bounds"):
        opt.step()
    assert_unchanged(opt, [param], before)


def _lookup_model(kind: str) -> nn.Module:
    if kind == "embedding-padding_idx":
        return nn.Embedding(30, 5, sparse=True, padding_idx=0)
    if kind == "embedding-max_norm":  # renormalizes looked-up rows in place, in the forward
        return nn.Embedding(30, 5, sparse=True, max_norm=1.0)
    return nn.EmbeddingBag(30, 5, mode=kind.removeprefix("bag-"), sparse=True)


@pytest.mark.parametrize(
    "kind", ["embedding-padding_idx", "embedding-max_norm", "bag-sum", "bag-mean"]
)
def test_other_modules_with_sparse_grads(kind):
    """The sparse grads of nn.Embedding's variants and nn.EmbeddingBag, against torch."""
    torch.manual_seed(34)
    ref_model = _lookup_model(kind)
    fast_model = copy.deepcopy(ref_model)
    kwargs = dict(lr=0.1, lr_decay=0.05, initial_accumulator_value=0.1)
    ref, fast = optimizer_pair("Adagrad", ref_model.parameters(), fast_model.parameters(), **kwargs)
    gen_ref, gen_fast = generator(35), generator(35)
    for step in range(5):
        for model, opt, gen in ((ref_model, ref, gen_ref), (fast_model, fast, gen_fast)):
            opt.zero_grad()
            rows = torch.randint(0, 30, (6, 4), generator=gen)  # 6 bags (or batches) of 4
            model(rows).square().sum().backward()
        assert fast_model.weight.grad.is_sparse
        ref.step()
        fast.step()
        assert_matches_reference(
            ref, fast, list(ref_model.parameters()), list(fast_model.parameters()), **FP32,
            where=f"step {step}",
        )  # fmt: skip
