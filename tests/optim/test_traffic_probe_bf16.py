"""The traffic probe over bfloat16 streams beside float32 ones (the roofline of a step that keeps
some of its tensors in 16 bits), and the precision benchmark's use of it: each mode's roofline
runs that mode's own streams."""

from __future__ import annotations

import pytest
import torch
from helpers.rng import generator

import fastopt
from fastopt.benchmarking import optimizers, precision

F32, BF16 = torch.float32, torch.bfloat16
SIZES = (1, 7, 0, 4097, 33000, 16)


def _streams(dtypes, sizes, gen):
    return [[torch.randn(n, generator=gen).to(dtype) for n in sizes] for dtype in dtypes]


def _flat(streams):
    return [t for stream in streams for t in stream]


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize(
    "updated, read",
    [
        ((BF16,), (BF16,)),
        ((F32, BF16, BF16), (F32,)),
        ((BF16, F32, BF16, BF16), (BF16,)),
        ((BF16, BF16, BF16, BF16), (BF16,)),
        ((BF16, F32), (F32, F32, BF16)),
    ],
)
def test_probe_with_bf16_streams_touches_each_and_changes_none(updated, read, prefetch):
    gen = generator(len(updated) * 10 + len(read))
    up, rd = _streams(updated, SIZES, gen), _streams(read, SIZES, gen)
    before = [[t.clone() for t in stream] for stream in up]
    probe = torch.ops.fastopt.traffic_probe_
    probe(_flat(up), _flat(rd), len(SIZES), prefetch)
    for t, b in zip(_flat(up), _flat(before), strict=True):
        assert t.dtype == b.dtype and torch.equal(t, b)
    # NaN in tensor 3 of each read stream in turn (float32 or bfloat16) reaches every element of
    # tensor 3 of every updated stream, whatever its dtype, and no other tensor.
    for stream in rd:
        stream[3].fill_(float("nan"))
        probe(_flat(up), _flat(rd), len(SIZES), prefetch)
        for u, b in zip(up, before, strict=True):
            assert bool(u[3].isnan().all())
            for i, t in enumerate(u):
                assert i == 3 or torch.equal(t, b[i])
            u[3].copy_(b[3])
        stream[3].normal_(generator=gen)


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("read", [(BF16,), (F32, BF16), (F32, F32, F32, BF16)])
def test_probe_reading_bf16_streams_reads_every_element(read, prefetch):
    """Small whole numbers are exact in bfloat16 and their float32 sum is exact in any order."""
    gen = generator(30 + len(read))
    streams = [
        [torch.randint(0, 4, (n,), generator=gen).to(dtype) for n in SIZES] for dtype in read
    ]
    total = torch.full((1,), -1.0)
    torch.ops.fastopt.traffic_probe_([], _flat(streams), len(SIZES), prefetch, total)
    assert total.item() == sum(t.double().sum().item() for t in _flat(streams))


def test_probe_with_bf16_streams_opcheck():
    gen = generator(4)
    up, rd = _streams((BF16, F32), (5, 4097, 1), gen), _streams((BF16,), (5, 4097, 1), gen)
    torch.library.opcheck(torch.ops.fastopt.traffic_probe_, (_flat(up), _flat(rd), 3, True))


def test_probe_refuses_other_dtypes_and_a_second_bf16_read_stream():
    probe = torch.ops.fastopt.traffic_probe_
    with pytest.raises(RuntimeError, match="contiguous float32 or bfloat16 CPU tensors"):
        probe([torch.zeros(3, dtype=torch.float16)], [torch.zeros(3)])
    with pytest.raises(RuntimeError, match="at most 1 bfloat16 read stream"):
        probe([torch.zeros(3)], [torch.zeros(3, dtype=BF16), torch.zeros(3, dtype=BF16)])


_OPTIONS = {
    "fastopt fp32": {},
    "fastopt bf16": {},
    "fastopt fp32 + bf16 state": {"state_dtype": BF16},
    "fastopt bf16 + fp32 master + fp32 state": {"master_weights": True},
    "fastopt bf16 + fp32 master + bf16 state": {"master_weights": True, "state_dtype": BF16},
    "fastopt bf16 + remainder + bf16 state": {"master_weights": "remainder", "state_dtype": BF16},
}


@pytest.mark.parametrize("name", list(_OPTIONS))
def test_precision_modes_declare_their_steps_own_streams(name):
    """A mode's probe streams are what its step reads and writes: the param and every per-element
    state tensor (master or remainder, moments) updated, the grad read, each at its width; and
    its bytes per param are theirs (no other pass)."""
    mode = next(m for m in precision.MODES if m.name == name)
    params = precision.make_params(mode.param_dtype, 9000, "cpu")
    optimizer = fastopt.FusedAdamW(params, lr=1e-4, **_OPTIONS[name])
    optimizer.step()
    p = params[0]
    state = [v for v in optimizer.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
    widths = sorted(t.element_size() for t in [p, *state])
    assert widths == sorted(torch.empty(0, dtype=d).element_size() for d in mode.updated)
    assert (p.grad.dtype,) == mode.read
    assert mode.bytes_per_param == mode.stream_bytes


def test_precision_probe_runs_cover_each_set_of_streams_once_per_loop_form():
    """One probe per distinct set of the modes' streams and loop form, over tensors of those
    dtypes; a mode's roofline is its streams' time, scaled to the bytes of its other passes."""
    modes = precision.MODES + precision.STEP_READS + precision.GRAD_READS
    runs = precision.probe_runs(modes, 100)
    distinct = {(m.updated, m.read) for m in modes}
    assert len(runs) == len(distinct) * len(optimizers.PROBE_FORMS)
    assert {streams for streams, _ in runs.values()} == distinct
    for _, fn in runs.values():
        fn()  # runs: the streams' dtypes are the probe's to take
    streams_ms = {streams: float(i + 1) for i, streams in enumerate(sorted(distinct, key=str))}
    rooflines = precision.rooflines_ms(modes, streams_ms)
    for mode in modes:
        expected = streams_ms[(mode.updated, mode.read)] * mode.bytes_per_param / mode.stream_bytes
        assert rooflines[mode.name] == pytest.approx(expected)
    clipped = next(m for m in modes if m.name == "fastopt fp32, clipped")
    assert rooflines[clipped.name] == pytest.approx(rooflines["fastopt fp32"] * 32 / 28)


def test_precision_rooflines_on_a_gpu_are_the_copy_bandwidth_scaled_to_each_modes_bytes(
    monkeypatch,
):
    """Off the CPU there is no probe: each mode's roofline is its bytes moved at the device's copy
    bandwidth, the copy timed once for all modes."""
    timed = []
    monkeypatch.setattr(precision, "copy_roofline", lambda device: ("copy", 2000))
    monkeypatch.setattr(precision, "median_ms", lambda fn, device: timed.append(fn) or 3.0)
    numel = 1000
    streams_ms = precision.copy_rooflines_ms(precision.MODES, numel, "cuda")
    rooflines = precision.rooflines_ms(precision.MODES, streams_ms)
    assert timed == ["copy"]
    for mode in precision.MODES:
        expected = 3.0 / 2000 * mode.bytes_per_param * numel
        assert rooflines[mode.name] == pytest.approx(expected)
