"""The traffic probe over many tensors per stream (the roofline of a step over many tensors), with
updated streams or only reading, and the benchmarks' wiring of it to fastopt's own step tensors
(the optimizer table's roofline, the precision table's reads of an fp32 step and the least cost
of clipping derived from them)."""

from __future__ import annotations

import pytest
import torch
from helpers.rng import generator

import fastopt
from fastopt.benchmarking import optimizers, precision

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


def _integer_streams(n_read: int, sizes, seed: int):
    """Read streams of small whole numbers: their float32 sum is exact in any order."""
    gen = generator(seed)
    return [
        [torch.randint(0, 4, (n,), generator=gen).float() for n in sizes] for _ in range(n_read)
    ]


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("n_read", [1, 2, 3, 4])
def test_probe_without_updated_streams_reads_every_element(n_read, prefetch):
    """With no updated stream the probe only reads, and its total is the exact sum of every
    element of every read tensor (one element left out would change it)."""
    read = _integer_streams(n_read, SIZES, seed=20 + n_read)
    before = [t.clone() for t in _flat(read)]
    total = torch.full((1,), -1.0)
    torch.ops.fastopt.traffic_probe_([], _flat(read), len(SIZES), prefetch, total)
    assert total.item() == sum(t.sum().item() for t in _flat(read))
    for t, b in zip(_flat(read), before, strict=True):
        assert torch.equal(t, b)


def test_probe_without_updated_streams_opcheck():
    read = _integer_streams(4, (5, 4097, 1), seed=3)
    torch.library.opcheck(
        torch.ops.fastopt.traffic_probe_, ([], _flat(read), 3, True, torch.zeros(1))
    )


def test_probe_takes_a_total_exactly_when_it_only_reads():
    updated, read = _streams(1, 1, (5, 6), seed=4)
    probe = torch.ops.fastopt.traffic_probe_
    total = torch.zeros(1)
    with pytest.raises(RuntimeError, match="pass `total`"):
        probe([], _flat(read), 2)
    with pytest.raises(RuntimeError, match="pass `total`"):
        probe(_flat(updated), _flat(read), 2, True, total)
    with pytest.raises(RuntimeError, match="one-element float32"):
        probe([], _flat(read), 2, True, torch.zeros(2))
    with pytest.raises(RuntimeError, match="1 to 4 read"):
        probe([], _flat(read) * 5, 2, True, total)
    assert total.item() == 0.0


def test_probes_helper_reads_only_without_updated_streams():
    """optimizers.probes with no updated stream: every loop form reads and changes nothing."""
    read = _integer_streams(4, SIZES, seed=5)
    before = [t.clone() for t in _flat(read)]
    forms = optimizers.probes([], read)
    assert len(forms) == len(optimizers.PROBE_FORMS)
    for fn in forms.values():
        fn()
    for t, b in zip(_flat(read), before, strict=True):
        assert torch.equal(t, b)


@pytest.mark.parametrize("mode", precision.STEP_READS, ids=lambda m: m.name)
def test_precision_step_reads_change_nothing(mode):
    params = precision.make_params(torch.float32, 9000, "cpu")
    read = mode.make(params)
    before = [p.clone() for p in params] + [p.grad.clone() for p in params]
    read()
    after = list(params) + [p.grad for p in params]
    for t, b in zip(after, before, strict=True):
        assert torch.equal(t, b)
    assert mode.bytes_per_param == 16 and (mode.updated, mode.read) == ((), (torch.float32,) * 4)


def _result(mode, ms, roofline_ms):
    return precision.Result(mode, ms, roofline_ms)


def test_clipping_line_sets_the_least_cost_against_the_measured_one():
    """The least cost is the faster probe reading the grads alone, over the fp32 step's roofline
    time; the line also gives the norm pass's own time."""
    modes = {m.name: m for m in precision.MODES}
    step = _result(modes["fastopt fp32"], 10.0, 9.0)
    clipped = _result(modes["fastopt fp32, clipped"], 12.5, 9.9)
    norm = _result(modes["fastopt grad_norm alone (clipping's pass)"], 2.2, 1.0)
    plain, prefetched = precision.GRAD_READS
    slow = [_result(plain, 3.5, 1.0), _result(prefetched, 3.0, 1.0)]
    line = precision.clipping_line([step, clipped, norm, *slow])
    assert "2.50 ms to the fp32 step (+25%); its norm pass alone takes 2.20 ms" in line
    assert "(3.00 ms), 33% of the fp32 step's roofline time (9.00 ms)" in line
    assert "out of reach here" in line
    fast = [_result(plain, 1.0, 1.0), _result(prefetched, 1.2, 1.0)]
    line = precision.clipping_line([step, clipped, norm, *fast])
    assert "(1.00 ms), 11%" in line and "within reach here" in line
    assert precision.clipping_line([step, clipped, norm]) is None


@pytest.mark.parametrize("mode", precision.GRAD_READS, ids=lambda m: m.name)
def test_precision_grad_reads_read_every_grad_in_quarters_and_change_nothing(mode, monkeypatch):
    """The probe reads four quarter ranges of each grad (views, no copy) and nothing else."""
    params = precision.make_params(torch.float32, 9001, "cpu")
    seen = []
    real_probes = precision.probes

    def recording_probes(updated, read):
        seen.append((updated, read))
        return real_probes(updated, read)

    monkeypatch.setattr(precision, "probes", recording_probes)
    read = mode.make(params)
    before = [p.clone() for p in params] + [p.grad.clone() for p in params]
    read()
    ((updated, streams),) = seen
    assert updated == [] and len(streams) == 4
    for p, *quarters in zip(params, *streams, strict=True):
        q = p.numel() // 4
        for k, view in enumerate(quarters):
            assert view.numel() == q
            assert q == 0 or view.data_ptr() == p.grad.data_ptr() + 4 * k * q
    after = list(params) + [p.grad for p in params]
    for t, b in zip(after, before, strict=True):
        assert torch.equal(t, b)
    assert mode.bytes_per_param == 4
