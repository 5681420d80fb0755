"""The ops under torch.ops.fastopt: opcheck (schema, fake, autograd registration, AOT dispatch),
and torch.compile(fullgraph=True) of a training step and of the functional call."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    SHAPES,
    generator,
)
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import fastopt


def _adam_args(amsgrad, scaled, tensor_lr, seed=0, shapes=SHAPES, device="cpu"):
    gen = generator(seed)

    def randn(shape):
        return torch.randn(shape, generator=gen).to(device)

    params = [randn(s) for s in shapes]
    grads = [randn(s) for s in shapes]
    exp_avgs = [randn(s) for s in shapes]
    exp_avg_sqs = [randn(s).abs() for s in shapes]
    max_sqs = [v + randn(v.shape).abs() for v in exp_avg_sqs] if amsgrad else []
    steps = [torch.tensor(float(i + 1), device=device) for i in range(len(shapes))]
    return (
        params, grads, exp_avgs, exp_avg_sqs, max_sqs, steps,
        0.0 if tensor_lr else 0.01,
        torch.tensor(0.01, device=device) if tensor_lr else None,
        0.9, 0.999, 1e-8, 0.1, True, amsgrad, False,
        torch.tensor(8.0, device=device) if scaled else None,
        torch.tensor(0.0, device=device) if scaled else None,
    )  # fmt: skip


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "grad_scale+found_inf"])
@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float-lr", "tensor-lr"])
def test_opcheck_adam_step(amsgrad, scaled, tensor_lr):
    args = _adam_args(amsgrad, scaled, tensor_lr)
    torch.library.opcheck(torch.ops.fastopt.adam_step_, args)


def test_opcheck_adam_step_skipped_by_found_inf():
    args = list(_adam_args(True, True, False))
    args[-1] = torch.tensor(1.0)
    torch.library.opcheck(torch.ops.fastopt.adam_step_, tuple(args))


@pytest.mark.parametrize("n_updated, n_read", [(1, 1), (2, 1), (3, 1), (4, 2)])
def test_opcheck_traffic_probe(n_updated, n_read):
    gen = generator(1)
    updated = [torch.randn(4097, generator=gen) for _ in range(n_updated)]
    read = [torch.randn(4097, generator=gen) for _ in range(n_read)]
    torch.library.opcheck(torch.ops.fastopt.traffic_probe_, (updated, read))


@pytest.mark.parametrize("n_updated, n_read", [(1, 1), (3, 1), (2, 2)])
def test_traffic_probe_moves_the_bytes_it_claims(n_updated, n_read):
    """Its arithmetic, spelled out: the probe is a roofline, but it must touch every element."""
    gen = generator(2)
    updated = [torch.randn(4097, generator=gen) for _ in range(n_updated)]
    read = [torch.randn(4097, generator=gen) for _ in range(n_read)]
    read_sum = sum(read[1:], read[0])
    expected = [u * 0.9 + read_sum for u in updated]
    torch.ops.fastopt.traffic_probe_(updated, read)
    for u, e in zip(updated, expected, strict=True):
        torch.testing.assert_close(u, e)


def test_traffic_probe_refuses_bad_input():
    with pytest.raises(RuntimeError, match="1 to 4 updated"):
        torch.ops.fastopt.traffic_probe_([torch.zeros(3)] * 5, [torch.zeros(3)])
    with pytest.raises(RuntimeError, match="contiguous float32"):
        torch.ops.fastopt.traffic_probe_([torch.zeros(3)], [torch.zeros(4)])


def test_fake_implementation_checks_shapes():
    args = list(_adam_args(False, False, False, device="meta"))
    args[1] = [g.reshape(-1) if g.dim() == 2 else g for g in args[1]]
    with pytest.raises(RuntimeError, match=r"grads\[3\] is"):
        torch.ops.fastopt.adam_step_(*args)
    args = list(_adam_args(False, False, False, device="meta"))
    args[2] = args[2][:-1]
    with pytest.raises(RuntimeError, match="exp_avgs has"):
        torch.ops.fastopt.adam_step_(*args)
    args = list(_adam_args(False, False, False, device="meta"))
    args[5] = [s.double() for s in args[5]]
    with pytest.raises(RuntimeError, match=r"steps\[0\] must be a one-element float32"):
        torch.ops.fastopt.adam_step_(*args)


# -- torch.compile ---------------------------------------------------------------------------


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

    compiled_args = _adam_args(True, True, True, seed=5)
    eager_args = _adam_args(True, True, True, seed=5)

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


# -- autograd semantics of the in-place op ----------------------------------------------------


@pytest.mark.parametrize("entry", ["functional", "torch.ops"])
def test_op_refuses_grad_mode_on_tensors_that_require_grad(entry):
    args = list(_adam_args(False, False, False, shapes=[(7,), (3, 5)]))
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
