"""The optimizers' ops under torch.ops.fastopt and the traffic probe: opcheck (schema, fake,
autograd registration, AOT dispatch), the fake implementations' checks, the dispatcher route of
a step, torch.compile(fullgraph=True) of a training step, of opt.step and of a functional call,
the in-place semantics autograd must see, fastopt.functional's signatures, and the eager entry
against torch.ops."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from helpers.optim_cases import NON_ADAM_OPTIMIZERS, OPTIMIZERS, RICH, SHAPES
from helpers.optim_compare import assert_matches_reference
from helpers.optim_pairs import make_param_pairs, optimizer_pair, set_grads
from helpers.rng import generator
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import fastopt
from fastopt import _extension

OPS = {"RMSprop": "rmsprop_step_", "Adagrad": "adagrad_step_", "Adadelta": "adadelta_step_",
       "Adam": "adam_step_", "AdamW": "adam_step_"}  # fmt: skip

pytestmark = pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning")


def _op_args(
    name,
    scaled,
    tensor_lr,
    seed=0,
    shapes=SHAPES,
    device="cpu",
    found_inf=0.0,
    plain=False,
    amsgrad=False,
):
    """The positional arguments of torch.ops.fastopt.<op> for `name`: random state that keeps
    every denominator positive; with `plain`, RMSprop without momentum and centering; `amsgrad`
    for Adam / AdamW."""
    gen = generator(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen).to(device)

    def positive(shape):
        return randn(shape).abs() + 0.1

    params = [randn(s) for s in shapes]
    grads = [randn(s) for s in shapes]
    steps = [torch.tensor(float(i + 1), device=device) for i in range(len(shapes))]
    lr = (0.0, torch.tensor(0.01, device=device)) if tensor_lr else (0.01, None)
    amp = (
        (torch.tensor(8.0, device=device), torch.tensor(found_inf, device=device))
        if scaled
        else (None, None)
    )
    # masters, grad_norm, max_grad_norm, rounding_seeds: none of the precision options.
    plain_precision = ([], None, 0.0, [])
    if name in ("Adam", "AdamW"):
        exp_avgs = [randn(s) for s in shapes]
        exp_avg_sqs = [randn(s).abs() for s in shapes]
        max_sqs = [v + randn(v.shape).abs() for v in exp_avg_sqs] if amsgrad else []
        return (
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, *lr,
            0.9, 0.999, 1e-8, 0.1, name == "AdamW", amsgrad, False, *amp, *plain_precision,
        )  # fmt: skip
    if name == "RMSprop":
        grad_avgs = [] if plain else [0.1 * randn(s) for s in shapes]
        square_avgs = [positive(s) for s in shapes]
        if not plain:
            square_avgs = [s + g * g for s, g in zip(square_avgs, grad_avgs, strict=True)]
        momentum_buffers = [] if plain else [randn(s) for s in shapes]
        momentum, centered = (0.0, False) if plain else (0.5, True)
        return (
            params, grads, square_avgs, momentum_buffers, grad_avgs, steps, *lr,
            0.99, 1e-8, 0.1, momentum, centered, False, *amp, *plain_precision,
        )  # fmt: skip
    if name == "Adagrad":
        state_sums = [positive(s) for s in shapes]
        return (
            params, grads, state_sums, steps, *lr, 0.1, 0.1, 1e-10, True, *amp, *plain_precision,
        )  # fmt: skip
    square_avgs = [positive(s) for s in shapes]
    acc_deltas = [positive(s) for s in shapes]
    return (
        params, grads, square_avgs, acc_deltas, steps, *lr, 0.9, 1e-6, 0.1, False, *amp,
        *plain_precision,
    )  # fmt: skip


def _op(name):
    return getattr(torch.ops.fastopt, OPS[name])


@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale+found_inf"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_opcheck(name, scaled, tensor_lr):
    torch.library.opcheck(_op(name), _op_args(name, scaled, tensor_lr))


def test_opcheck_rmsprop_without_momentum_and_centering():
    torch.library.opcheck(_op("RMSprop"), _op_args("RMSprop", True, False, plain=True))


@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
def test_opcheck_skipped_by_found_inf(name):
    torch.library.opcheck(_op(name), _op_args(name, True, False, found_inf=1.0))


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale+found_inf"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_opcheck_adam_step(amsgrad, scaled, tensor_lr):
    args = _op_args("AdamW", scaled, tensor_lr, amsgrad=amsgrad)
    torch.library.opcheck(torch.ops.fastopt.adam_step_, args)


def test_opcheck_adam_step_skipped_by_found_inf():
    args = _op_args("AdamW", True, False, found_inf=1.0, amsgrad=True)
    torch.library.opcheck(torch.ops.fastopt.adam_step_, args)


def _sparse_args(scaled, tensor_lr, found_inf=0.0, seed=1):
    gen = generator(seed)
    param = torch.randn(50, 3, 4, generator=gen)
    indices = torch.tensor([[49, 2, 2, 17, 0, 2]])
    values = torch.randn(6, 3, 4, generator=gen)
    grad = torch.sparse_coo_tensor(indices, values, (50, 3, 4), check_invariants=True)
    state_sum = torch.rand(50, 3, 4, generator=gen) + 0.1
    lr = (0.0, torch.tensor(0.1)) if tensor_lr else (0.1, None)
    amp = (torch.tensor(8.0), torch.tensor(found_inf)) if scaled else (None, None)
    return (param, grad, state_sum, torch.tensor(3.0), *lr, 0.1, 1e-10, True, *amp)


# opcheck's test_schema and test_aot_dispatch_dynamic cannot take sparse inputs at all (torch's
# own aten.add_ with a sparse COO argument fails both: "Cannot access storage of
# SparseTensorImpl"), so the sparse op gets the other two.
SPARSE_OPCHECKS = ("test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale+found_inf"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_opcheck_sparse_adagrad_step(scaled, tensor_lr):
    torch.library.opcheck(
        torch.ops.fastopt.sparse_adagrad_step_,
        _sparse_args(scaled, tensor_lr),
        test_utils=SPARSE_OPCHECKS,
    )


def test_opcheck_sparse_adagrad_step_skipped_by_found_inf():
    torch.library.opcheck(
        torch.ops.fastopt.sparse_adagrad_step_,
        _sparse_args(True, False, found_inf=1.0),
        test_utils=SPARSE_OPCHECKS,
    )


@pytest.mark.parametrize("n_updated, n_read", [(1, 1), (2, 1), (3, 1), (4, 2), (3, 2)])
def test_opcheck_traffic_probe(n_updated, n_read):
    gen = generator(1)
    updated = [torch.randn(4097, generator=gen) for _ in range(n_updated)]
    read = [torch.randn(4097, generator=gen) for _ in range(n_read)]
    torch.library.opcheck(torch.ops.fastopt.traffic_probe_, (updated, read))


@pytest.mark.parametrize("n_updated, n_read", [(1, 1), (3, 1), (2, 2)])
def test_traffic_probe_moves_the_bytes_it_claims(n_updated, n_read):
    """Its arithmetic, spelled out: u * 1 + sum(read) * 0 into every updated u, which leaves
    finite tensors as they were (so that it can run on an optimizer's own tensors) and turns every
    element of every updated tensor into NaN where the read ones are NaN (so it must touch each)."""
    gen = generator(2)
    updated = [torch.randn(4097, generator=gen) for _ in range(n_updated)]
    read = [torch.randn(4097, generator=gen) for _ in range(n_read)]
    before = [u.clone() for u in updated]
    torch.ops.fastopt.traffic_probe_(updated, read)
    for u, b in zip(updated, before, strict=True):
        assert torch.equal(u, b)
    read[-1].fill_(float("nan"))
    torch.ops.fastopt.traffic_probe_(updated, read)
    for u in updated:
        assert bool(u.isnan().all())


def test_traffic_probe_refuses_bad_input():
    with pytest.raises(RuntimeError, match="1 to 4 updated"):
        torch.ops.fastopt.traffic_probe_([torch.zeros(3)] * 5, [torch.zeros(3)])
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.fastopt.traffic_probe_([torch.zeros(3)], [torch.zeros(4)])


def test_traffic_probe_writes_only_the_updated_tensors():
    gen = generator(3)
    updated = [torch.randn(4097, generator=gen) for _ in range(3)]
    read = [torch.randn(4097, generator=gen) for _ in range(2)]
    read_before = [t.clone() for t in read]
    updated_before = [t.clone() for t in updated]
    torch.ops.fastopt.traffic_probe_(updated, read)
    for t, b in zip(read, read_before, strict=True):
        assert torch.equal(t, b)
    # Every updated tensor is written back as it was (test_traffic_probe_moves_the_bytes_it_claims
    # shows that each element is written).
    for t, b in zip(updated, updated_before, strict=True):
        assert torch.equal(t, b)


# -- fakes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
def test_fake_implementation_checks_shapes_and_lengths(name):
    args = list(_op_args(name, False, False, device="meta"))
    args[1] = [g.reshape(-1) if g.dim() == 2 else g for g in args[1]]
    with pytest.raises(RuntimeError, match=r"grads\[3\]"):
        _op(name)(*args)
    args = list(_op_args(name, False, False, device="meta"))
    args[2] = args[2][:-1]
    with pytest.raises(RuntimeError, match="has 5 tensors but params has 6"):
        _op(name)(*args)
    args = list(_op_args(name, False, False, device="meta"))
    step_index = {"RMSprop": 5, "Adagrad": 3, "Adadelta": 4}[name]
    args[step_index] = [s.double() for s in args[step_index]]
    with pytest.raises(RuntimeError, match=r"steps\[0\]"):
        _op(name)(*args)


def test_meta_adam_step_checks_shapes_and_lengths():
    """On meta tensors (what torch.compile traces with) the op runs the checks of every device."""
    args = list(_op_args("AdamW", False, False, device="meta"))
    args[1] = [g.reshape(-1) if g.dim() == 2 else g for g in args[1]]
    with pytest.raises(RuntimeError, match=r"grads\[3\] has shape \[2145\]"):
        torch.ops.fastopt.adam_step_(*args)
    args = list(_op_args("AdamW", False, False, device="meta"))
    args[2] = args[2][:-1]
    with pytest.raises(RuntimeError, match="exp_avgs has"):
        torch.ops.fastopt.adam_step_(*args)
    args = list(_op_args("AdamW", False, False, device="meta"))
    args[5] = [s.double() for s in args[5]]
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a one-element float32"):
        torch.ops.fastopt.adam_step_(*args)


def test_fake_rmsprop_checks_the_optional_lists():
    """momentum_buffers must be empty when momentum == 0, grad_avgs when not centered."""
    args = list(_op_args("RMSprop", False, False, device="meta"))
    args[11] = 0.0  # momentum 0, but momentum_buffers given
    with pytest.raises(RuntimeError, match="momentum_buffers"):
        torch.ops.fastopt.rmsprop_step_(*args)
    args = list(_op_args("RMSprop", False, False, device="meta"))
    args[12] = False  # not centered, but grad_avgs given
    with pytest.raises(RuntimeError, match="grad_avgs"):
        torch.ops.fastopt.rmsprop_step_(*args)


def test_fake_sparse_adagrad_step_checks_shapes():
    """Under FakeTensorMode (what torch.compile traces with)."""
    args = list(_sparse_args(False, False))
    args[2] = torch.rand(49, 3, 4)  # state_sum one row short
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(RuntimeError, match="state_sum"):
            torch.ops.fastopt.sparse_adagrad_step_(*fake)


# -- the dispatcher route ---------------------------------------------------------------------


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_step_goes_through_the_dispatcher(name):
    params = [torch.randn(7, requires_grad=True), torch.randn(3, 5, requires_grad=True)]
    opt = getattr(fastopt, f"Fused{name}")(params, **RICH[name])
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with _RecordOps() as mode:
        opt.step()
    assert f"fastopt.{OPS[name]}.default" in mode.ops
    assert all(opt.state[p]["step"].item() == 2 for p in params)


def test_sparse_adagrad_step_goes_through_the_dispatcher():
    p = torch.randn(10, 3, requires_grad=True)
    p.grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 4, 1]]), torch.randn(3, 3), (10, 3), check_invariants=True
    )
    opt = fastopt.FusedAdagrad([p], lr=0.1)
    with _RecordOps() as mode:
        opt.step()
    assert "fastopt.sparse_adagrad_step_.default" in mode.ops
    assert opt.state[p]["step"].item() == 1


# -- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_compiled_optimizer_step_fullgraph(name):
    """torch.compile(opt.step, fullgraph=True), with a Tensor lr, against torch's eager step."""
    torch._dynamo.reset()
    ref_params, fast_params = make_param_pairs([(7,), (33, 65), (1,), (0,)], seed=6)
    kwargs = {**RICH[name], "lr": torch.tensor(RICH[name]["lr"])}
    ref, fast = optimizer_pair(name, ref_params, fast_params, **kwargs)
    counter = CompileCounterWithBackend("inductor")
    compiled_step = torch.compile(fast.step, fullgraph=True, backend=counter)
    gen = generator(7)
    for step in range(4):
        set_grads(gen, ref_params, fast_params)
        ref.step()
        compiled_step()
        assert_matches_reference(ref, fast, ref_params, fast_params, 1e-5, 1e-6, f"{step}")
    graph_ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    op = f"fastopt.{OPS[name]}"
    assert {op, f"{op}.default"} & graph_ops, graph_ops


def _train_step_fn(model, opt):
    def train_step(x, y):
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return train_step


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_compiled_training_step_fullgraph(tensor_lr):
    """forward, backward and FusedAdam.step in one fullgraph-compiled function, against the same
    steps in eager mode with torch.optim.Adam(foreach=False).

    Tracing `loss.backward()` needs torch._dynamo.config.trace_autograd_ops (torch's own switch,
    off by default); `opt.zero_grad()` is skipped by dynamo on purpose, so it stays outside.
    """
    torch._dynamo.reset()
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 17), nn.Tanh(), nn.Linear(17, 3))
    ref_model = copy.deepcopy(model)
    lr = torch.tensor(0.01) if tensor_lr else 0.01
    opt = fastopt.FusedAdam(model.parameters(), lr=lr, weight_decay=0.1, amsgrad=True)
    ref_opt = torch.optim.Adam(
        ref_model.parameters(), lr=0.01, weight_decay=0.1, amsgrad=True, foreach=False
    )
    counter = CompileCounterWithBackend("inductor")
    gen = generator(4)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        compiled = torch.compile(_train_step_fn(model, opt), fullgraph=True, backend=counter)
        reference = _train_step_fn(ref_model, ref_opt)
        for step in range(4):
            x, y = torch.randn(5, 6, generator=gen), torch.randn(5, 3, generator=gen)
            loss = compiled(x, y)
            ref_loss = reference(x, y)
            opt.zero_grad()
            ref_opt.zero_grad()
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            for p, r in zip(model.parameters(), ref_model.parameters(), strict=True):
                torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=f"step {step}")
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    torch.testing.assert_close(
                        opt.state[p][key], ref_opt.state[r][key], rtol=1e-5, atol=1e-6
                    )
                assert opt.state[p]["step"].item() == step + 1
    assert counter.frame_count >= 1
    # The op is in the graph (not run in a graph break or silently dropped).
    graph_ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    assert {"fastopt.adam_step_", "fastopt.adam_step_.default"} & graph_ops, graph_ops


def test_compiled_functional_adam_step_fullgraph():
    """fastopt.functional.adam_step_ compiled alone, against the same call in eager mode."""
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")

    @torch.compile(fullgraph=True, backend=counter)
    def step_fn(params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, lr, grad_scale, found_inf):
        fastopt.functional.adam_step_(
            params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps, lr=lr, beta1=0.9,
            beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=True, grad_scale=grad_scale,
            found_inf=found_inf,
        )  # fmt: skip

    compiled_args = _op_args("AdamW", True, True, seed=5, amsgrad=True)
    eager_args = _op_args("AdamW", True, True, seed=5, amsgrad=True)

    def pick(a):
        return (*a[:6], a[7], a[15], a[16])

    for _ in range(3):
        step_fn(*pick(compiled_args))
        fastopt.functional.adam_step_(
            *eager_args[:6], lr=eager_args[7], beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=0.1, amsgrad=True, grad_scale=eager_args[15], found_inf=eager_args[16],
        )  # fmt: skip
    for compiled_list, eager_list in zip(compiled_args[:6], eager_args[:6], strict=True):
        for c, e in zip(compiled_list, eager_list, strict=True):
            torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1
    graph_ops = {str(n.target) for g in counter.graphs for n in g.graph.nodes}
    assert {"fastopt.adam_step_", "fastopt.adam_step_.default"} & graph_ops, graph_ops
    # The eager run really stepped (3 steps from the initial counts 1..6).
    assert [s.item() for s in eager_args[5]] == [float(i + 4) for i in range(len(SHAPES))]


# -- autograd semantics of the in-place ops ----------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_step_bumps_version_counters_like_torch(name):
    """A step modifies params in place: autograd must notice, as it does after torch's step."""
    state_key = {"RMSprop": "square_avg", "Adagrad": "sum", "Adadelta": "acc_delta"}.get(
        name, "exp_avg"
    )
    for make_opt in (
        lambda ps: getattr(torch.optim, name)(ps, foreach=False),
        getattr(fastopt, f"Fused{name}"),
    ):
        p = torch.randn(5, requires_grad=True)
        loss = (p * p).sum()  # saves p for backward
        opt = make_opt([p])
        p.grad = torch.randn(5)
        version = p._version
        state_version = opt.state[p][state_key]._version if name == "Adagrad" else 0
        opt.step()
        assert p._version > version
        assert opt.state[p][state_key]._version > state_version
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
def test_op_refuses_grad_mode_on_tensors_that_require_grad(name):
    args = list(_op_args(name, False, False, shapes=[(7,), (3, 5)]))
    args[0] = [p.requires_grad_() for p in args[0]]
    lists = [a for a in args if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)]
    before = [[t.detach().clone() for t in ts] for ts in lists]
    with pytest.raises(RuntimeError, match="requires grad"):
        _op(name)(*args)
    for ts, bs in zip(lists, before, strict=True):
        for t, b in zip(ts, bs, strict=True):
            assert torch.equal(t.detach(), b)
    with torch.no_grad():  # what optimizer.step() does
        _op(name)(*args)
    steps = lists[-1]
    assert [s.item() for s in steps] == [2.0, 3.0]


@pytest.mark.parametrize("entry", ["functional", "torch.ops"])
def test_adam_step_refuses_grad_mode_on_tensors_that_require_grad(entry):
    args = list(_op_args("AdamW", False, False, shapes=[(7,), (3, 5)]))
    args[0] = [p.requires_grad_() for p in args[0]]
    before = [[t.detach().clone() for t in ts] for ts in args[:6]]
    with pytest.raises(RuntimeError, match="requires grad"):
        if entry == "functional":
            fastopt.functional.adam_step_(
                *args[:6], lr=args[6], beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                decoupled_weight_decay=True,
            )  # fmt: skip
        else:
            torch.ops.fastopt.adam_step_(*args)
    for ts, bs in zip(args[:6], before, strict=True):
        for t, b in zip(ts, bs, strict=True):
            assert torch.equal(t.detach(), b)
    with torch.no_grad():  # what optimizer.step() does
        torch.ops.fastopt.adam_step_(*args)
    assert [s.item() for s in args[5]] == [2.0, 3.0]


# -- fastopt.functional ------------------------------------------------------------------------

# The documented signatures: positional tensor lists, then keyword-only hyperparameters.
REQUIRED = inspect.Parameter.empty
# The precision arguments every multi-tensor step takes.
PRECISION = dict(masters=(), grad_norm=None, max_grad_norm=None, rounding_seeds=())
FUNCTIONAL_SIGNATURES = {
    "rmsprop_step_": (
        ["params", "grads", "square_avgs", "momentum_buffers", "grad_avgs", "steps"],
        dict(lr=REQUIRED, alpha=REQUIRED, eps=REQUIRED, weight_decay=0.0, momentum=0.0,
             centered=False, maximize=False, grad_scale=None, found_inf=None, **PRECISION),
    ),
    "adagrad_step_": (
        ["params", "grads", "state_sums", "steps"],
        dict(lr=REQUIRED, lr_decay=0.0, weight_decay=0.0, eps=1e-10, maximize=False,
             grad_scale=None, found_inf=None, **PRECISION),
    ),
    "sparse_adagrad_step_": (
        ["param", "grad", "state_sum", "step"],
        dict(lr=REQUIRED, lr_decay=0.0, eps=1e-10, maximize=False, grad_scale=None,
             found_inf=None),
    ),
    "adadelta_step_": (
        ["params", "grads", "square_avgs", "acc_deltas", "steps"],
        dict(lr=REQUIRED, rho=REQUIRED, eps=REQUIRED, weight_decay=0.0, maximize=False,
             grad_scale=None, found_inf=None, **PRECISION),
    ),
}  # fmt: skip


@pytest.mark.parametrize("function", list(FUNCTIONAL_SIGNATURES))
def test_functional_signature(function):
    positional, keywords = FUNCTIONAL_SIGNATURES[function]
    parameters = list(inspect.signature(getattr(fastopt.functional, function)).parameters.values())
    assert [p.name for p in parameters[: len(positional)]] == positional
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in parameters[: len(positional)])
    rest = parameters[len(positional) :]
    assert all(p.kind is p.KEYWORD_ONLY for p in rest), function
    assert {p.name: p.default for p in rest} == keywords
    assert function in fastopt.functional.__all__


# -- the two routes into the ops --------------------------------------------------------------


class _Subclass(torch.Tensor):
    """A tensor subclass: the eager entry declines it and torch.ops takes over."""


def _eager_entry(name):
    return getattr(_extension.cpu_module(), OPS[name])


@pytest.mark.parametrize("name", NON_ADAM_OPTIMIZERS)
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale+found_inf"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_eager_entry_and_torch_ops_agree(name, scaled, tensor_lr):
    """The unboxed eager entry (what fastopt.functional calls) and torch.ops give bitwise the
    same result; the entry declines a tensor subclass (NotImplemented), changing nothing."""
    expected = _op_args(name, scaled, tensor_lr, seed=8)
    _op(name)(*expected)
    got = _op_args(name, scaled, tensor_lr, seed=8)
    assert _eager_entry(name)(*got) is None
    wrapped = list(_op_args(name, scaled, tensor_lr, seed=8))
    wrapped[0] = [p.as_subclass(_Subclass) for p in wrapped[0]]
    untouched = _op_args(name, scaled, tensor_lr, seed=8)
    assert _eager_entry(name)(*wrapped) is NotImplemented
    for got_arg, want_arg, wrapped_arg, start_arg in zip(
        got, expected, wrapped, untouched, strict=True
    ):
        if not isinstance(want_arg, list):
            continue
        for g, w, s, u in zip(got_arg, want_arg, wrapped_arg, start_arg, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)
            assert torch.equal(s.as_subclass(torch.Tensor), u)
