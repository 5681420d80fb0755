"""The traffic probe over many tensors per stream (the roofline of a step over many tensors), and
the benchmark's wiring of it to fastopt's own step tensors."""

from __future__ import annotations

import pytest
import torch
from helpers.rng import generator

import fastopt
from fastopt.benchmarking import optimizers

SIZES = (1, 7, 0, 4097, 33000, 16)


def _streams(n_updated: int, n_read: int, sizes, seed: int):
    gen = generator(seed)
    updated = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(n_updated)]
    read = [[torch.randn(n, generator=gen) for n in sizes] for _ in range(n_read)]
    return updated, read


def _flat(streams):
    return [t for stream in streams for t in stream]


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("n_updated, n_read", [(1, 1), (3, 1), (2, 2), (4, 2)])
def test_probe_over_many_tensors_touches_each_and_changes_none(n_updated, n_read, prefetch):
    updated, read = _streams(n_updated, n_read, SIZES, seed=n_updated * 10 + n_read)
    before = [t.clone() for t in _flat(updated)]
    probe = torch.ops.fastopt.traffic_probe_
    probe(_flat(updated), _flat(read), len(SIZES), prefetch)
    for t, b in zip(_flat(updated), before, strict=True):
        assert torch.equal(t, b)
    # NaN in tensor 3's grads reaches every element of tensor 3 in every updated stream, and no
    # other tensor: the probe pairs tensor i of every stream.
    read[-1][3].fill_(float("nan"))
    probe(_flat(updated), _flat(read), len(SIZES), prefetch)
    for stream in updated:
        assert bool(stream[3].isnan().all())
    for s, stream in enumerate(updated):
        for i, t in enumerate(stream):
            if i != 3:
                assert torch.equal(t, before[s * len(SIZES) + i])


def test_probe_over_many_tensors_opcheck():
    updated, read = _streams(3, 1, (5, 4097, 1), seed=1)
    torch.library.opcheck(torch.ops.fastopt.traffic_probe_, (_flat(updated), _flat(read), 3, False))


def test_probe_refuses_streams_it_cannot_pair():
    updated, read = _streams(2, 1, (5, 6), seed=2)
    probe = torch.ops.fastopt.traffic_probe_
    with pytest.raises(RuntimeError, match="`tensors` \\(2\\) tensors per stream"):
        probe(_flat(updated)[:3], _flat(read), 2)
    with pytest.raises(RuntimeError, match="of one size in every stream"):
        probe(_flat(updated), [read[0][1], read[0][0]], 2)
    with pytest.raises(RuntimeError, match="1 to 4 updated"):
        probe(_flat(updated) * 3, _flat(read), 2)
    with pytest.raises(RuntimeError, match="`tensors`"):
        probe(_flat(updated), _flat(read), 0)


@pytest.mark.parametrize("family", list(optimizers.FAMILIES))
def test_step_streams_are_the_step_tensors(family):
    """The roofline of a case runs on fastopt's own step tensors: params and every state tensor
    updated, grads read; running the probe on them changes none of them."""
    spec = optimizers.FAMILIES[family]
    case = optimizers.Case("t", "three tensors", (5, 4097, 1))
    params = optimizers.make_params(case, "cpu")
    optimizer = next(iter(spec.contenders.values()))(params)
    optimizer.step()
    updated, read = optimizers.step_streams(optimizer, spec)
    assert len(updated) == spec.updated and len(read) == spec.read
    assert updated[0] == params and read[0] == [p.grad for p in params]
    for stream in updated[1:]:
        for p, t in zip(params, stream, strict=True):
            assert any(t is s for s in optimizer.state[p].values())
            assert t.shape == p.shape and t.dtype == p.dtype
    before = [t.clone() for t in _flat(updated) + _flat(read)]
    for fn in optimizers.probes(updated, read).values():
        fn()
    for t, b in zip(_flat(updated) + _flat(read), before, strict=True):
        assert torch.equal(t, b)


def test_step_streams_refuse_an_optimizer_with_other_state():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    optimizer = fastopt.FusedAdam([p], amsgrad=True)
    optimizer.step()
    with pytest.raises(ValueError, match="expected 2 state tensors per param"):
        optimizers.step_streams(optimizer, optimizers.FAMILIES["adam"])
