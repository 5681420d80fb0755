"""The precision modes of an AdamW step (master weights, bfloat16 state, clipping) against
torch's fused AdamW, in bytes per param and ms, for `python -m fastopt bench` and
benchmarks/test_precision_step.py.

Each mode's roofline on the CPU is the traffic probe (`torch.ops.fastopt.traffic_probe_`) over
the mode's own streams (tensors updated, tensors only read), each in its dtype: float32 or 16
bits, so the probe moves the mode's bytes with its mix of reads and writes, which need not cost
the same. A mode with a pass of its own besides (clipping's norm) has its bytes per param scaled
from those of the step. On CUDA, the device's copy bandwidth scaled to the bytes (as for the
optimizer table).

On the CPU the table also times, in the same rounds as the steps and in each of its loop forms,
the probe reading an fp32 step's four streams without writing any (on a machine where the step's
time is set by what it reads, about the step's roofline), and the probe reading the grads alone,
as the norm pass does. Clipping must read the grads once more: the line below the table sets that
read's time, the least clipping can add, against the fp32 step's roofline time and against what
clipping measurably adds, so the table shows whether the target for clipping's cost can be met on
the machine it ran on. (Reading the 80 MB of grads alone is slower per byte than reading a step's
320 MB: a quarter of the latter's time is not a bound the grads can reach.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastopt

from .measurement import Measurement
from .optimizers import (
    FAMILIES,
    PROBE_FORMS,
    ROOFLINE,
    copy_roofline,
    mixed_sizes,
    probes,
    step_streams,
)
from .timing import interleaved_medians, median_ms

FEATURE = "precision"
NUMEL = 20_000_000
TENSORS = 64  # a model's worth of tensors, of mixed sizes

Step = Callable[[], object]


@dataclass(frozen=True)
class Mode:
    """One way to run an AdamW step: what it stores and what it moves per param."""

    name: str
    param_dtype: torch.dtype
    make: Callable[[list[torch.Tensor]], Step]  # params (with grads) -> one step
    bytes_per_param: int
    updated: tuple[torch.dtype, ...]  # streams read and written, each in its dtype
    read: tuple[torch.dtype, ...]  # streams only read
    is_step: bool = True  # False for the norm pass alone

    @property
    def is_torch(self) -> bool:
        return self.name.startswith("torch")

    @property
    def stream_bytes(self) -> int:
        """Bytes per param the streams move in one pass (bytes_per_param adds other passes)."""
        size = {torch.float32: 4, torch.bfloat16: 2}
        return 2 * sum(size[d] for d in self.updated) + sum(size[d] for d in self.read)


def _fastopt(**options) -> Callable[[list[torch.Tensor]], Step]:
    return lambda ps: fastopt.FusedAdamW(ps, lr=1e-4, **options).step


def _torch_fused(ps: list[torch.Tensor]) -> Step:
    return torch.optim.AdamW(ps, lr=1e-4, fused=True).step


def _fastopt_norm(ps: list[torch.Tensor]) -> Step:
    grads = [p.grad for p in ps]
    return lambda: torch.ops.fastopt.grad_norm(grads, 2.0, None)


def _torch_norm(ps: list[torch.Tensor]) -> Step:
    grads = [p.grad for p in ps]
    return lambda: torch.nn.utils.get_total_norm(grads, 2.0)


def _torch_clip_then_fused(ps: list[torch.Tensor]) -> Step:
    opt = torch.optim.AdamW(ps, lr=1e-4, fused=True)

    def step():
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        opt.step()

    return step


BF16, FP32 = torch.bfloat16, torch.float32
# Streams per param, in their dtypes: updated (param, master, moments: read and written), read
# (grad). A bfloat16 remainder moves the bytes of a bfloat16 stream.
FP32_STEP = (FP32, FP32, FP32), (FP32,)
# Bytes per param: the streams', plus those of other passes where a mode has some.
MODES = [
    Mode("torch AdamW(fused) fp32", FP32, _torch_fused, 28, *FP32_STEP),
    Mode("torch AdamW(fused) bf16", BF16, _torch_fused, 14, (BF16, BF16, BF16), (BF16,)),
    # clip_grad_norm_ reads the grads for the norm, then scales them in place.
    Mode("torch clip_grad_norm_ + AdamW(fused) fp32", FP32, _torch_clip_then_fused, 40, *FP32_STEP),
    Mode("fastopt fp32", FP32, _fastopt(), 28, *FP32_STEP),
    # A bf16 model with the default options: state in bf16 (torch's too), rounded to nearest.
    Mode("fastopt bf16", BF16, _fastopt(), 14, (BF16, BF16, BF16), (BF16,)),
    # The norm reads the grads once before the step.
    Mode("fastopt fp32, clipped", FP32, _fastopt(max_grad_norm=1.0), 32, *FP32_STEP),
    # Clipping's own pass, alone: it only reads, so its share is of a roofline for traffic it
    # does not have (the step's mixed streams); the probe rows below give its real bound.
    Mode("fastopt grad_norm alone (clipping's pass)", FP32, _fastopt_norm, 4, *FP32_STEP, False),
    Mode("torch get_total_norm alone", FP32, _torch_norm, 4, *FP32_STEP, False),
    Mode(
        "fastopt fp32 + bf16 state",
        FP32,
        _fastopt(state_dtype=BF16),
        20,
        (FP32, BF16, BF16),
        (FP32,),
    ),
    Mode(
        "fastopt bf16 + fp32 master + fp32 state",
        BF16,
        _fastopt(master_weights=True),
        30,
        (BF16, FP32, FP32, FP32),
        (BF16,),
    ),
    Mode(
        "fastopt bf16 + fp32 master + bf16 state",
        BF16,
        _fastopt(master_weights=True, state_dtype=BF16),
        22,
        (BF16, FP32, BF16, BF16),
        (BF16,),
    ),
    Mode(
        "fastopt bf16 + remainder + bf16 state",
        BF16,
        _fastopt(master_weights="remainder", state_dtype=BF16),
        18,
        (BF16, BF16, BF16, BF16),
        (BF16,),
    ),
]


StreamsOf = Callable[[list[torch.Tensor]], list[list[torch.Tensor]]]


def _reading(streams_of: StreamsOf, form: str) -> Callable[[list[torch.Tensor]], Step]:
    """params -> the traffic probe, in loop form `form`, reading the streams `streams_of` gives
    for them and writing none."""
    return lambda ps: probes([], streams_of(ps))[f"{ROOFLINE}, {form}"]


def _step_streams(ps: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Every stream of an fp32 AdamW step over these params (param, grad and both moments, after
    a first step made them)."""
    optimizer = fastopt.FusedAdamW(ps, lr=1e-4)
    optimizer.step()
    updated, read = step_streams(optimizer, FAMILIES["adam"])
    return updated + read


def _grad_quarters(ps: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """These params' grads as 4 streams of a quarter of each grad: the ranges grad_norm reads at
    once (a sequential stream per thread reads memory slower than several). The last elements of
    a grad whose size is not a multiple of 4 (3 at most) are left out."""
    flat = [p.grad.view(-1) for p in ps]
    return [[g[k * (g.numel() // 4) : (k + 1) * (g.numel() // 4)] for g in flat] for k in range(4)]


# On the CPU only (the probe is a CPU kernel): 16 bytes per param, all read.
STEP_READS = [
    Mode(
        f"probe: fp32 step's streams only read, {form}",
        FP32,
        _reading(_step_streams, form),
        16,
        (),
        (FP32,) * 4,
        False,
    )
    for form in PROBE_FORMS
]
# On the CPU only: the least time a second read of the grads (clipping's norm pass) can take.
GRAD_READS = [
    Mode(
        f"probe: the grads only read, {form}",
        FP32,
        _reading(_grad_quarters, form),
        4,
        (),
        (FP32,) * 4,
        False,
    )
    for form in PROBE_FORMS
]
CLIPPING_TARGET = 0.15  # the most clipping may add to an fp32 step's time on the CPU


def make_params(dtype: torch.dtype, numel: int, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for size in mixed_sizes(numel, TENSORS):
        p = torch.nn.Parameter(torch.randn(size, generator=gen).to(dtype=dtype, device=device))
        p.grad = (torch.randn(size, generator=gen) * 1e-3).to(dtype=dtype, device=device)
        params.append(p)
    return params


Streams = tuple[tuple[torch.dtype, ...], tuple[torch.dtype, ...]]  # (updated, read)


def _streams(mode: Mode) -> Streams:
    return mode.updated, mode.read


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ",".join(str(dtype).removeprefix("torch.") for dtype in dtypes) or "none"


def probe_runs(modes: list[Mode], numel: int) -> dict[str, tuple[Streams, Step]]:
    """The CPU traffic probe over each distinct set of the modes' streams (several modes share
    one), on tensors of its own (one of `numel` elements per stream), in each loop form:
    {run name: (streams, fn)}. Tensors of its own: a bfloat16 remainder's bits, passed as
    bfloat16, need not survive the probe's float32 round trip (a signalling NaN's are quieted)."""
    runs = {}
    for updated, read in dict.fromkeys(_streams(mode) for mode in modes):
        fns = probes(
            [[torch.randn(numel).to(dtype)] for dtype in updated],
            [[torch.randn(numel).to(dtype)] for dtype in read],
        )
        described = f"updated {_names(updated)}; read {_names(read)}"
        for name, fn in fns.items():
            runs[f"{name}: {described}"] = ((updated, read), fn)
    return runs


def rooflines_ms(modes: list[Mode], streams_ms: dict[Streams, float]) -> dict[str, float]:
    """{mode name: the roofline's time for the mode's bytes}, from the roofline's time for each
    set of streams: scaled to the bytes of the mode's other passes, where it has some."""
    return {m.name: streams_ms[_streams(m)] * m.bytes_per_param / m.stream_bytes for m in modes}


def copy_rooflines_ms(modes: list[Mode], numel: int, device: str) -> dict[Streams, float]:
    """On a GPU: each set of the modes' streams moved at the device's copy bandwidth, timed once
    for all of them."""
    copy, copy_bytes = copy_roofline(device)
    ms_per_byte = median_ms(copy, device) / copy_bytes
    return {_streams(m): ms_per_byte * m.stream_bytes * numel for m in modes}


@dataclass(frozen=True)
class Result:
    mode: Mode
    ms: float
    roofline_ms: float


def run(device: str, numel: int = NUMEL, repeats: int = 10) -> list[Result]:
    """Every mode (and on the CPU the step's reads alone) timed in interleaved rounds, one
    process, with its roofline: on the CPU the probe over the mode's streams, timed in the same
    rounds."""
    modes = MODES + (STEP_READS + GRAD_READS if device == "cpu" else [])
    steps = {}
    for mode in modes:
        step = mode.make(make_params(mode.param_dtype, numel, device))
        step()  # creates the state
        steps[mode.name] = step
    runs = probe_runs(modes, numel) if device == "cpu" else {}
    medians = interleaved_medians(
        steps | {name: fn for name, (_, fn) in runs.items()},
        device,
        repeats,
    )
    if device == "cpu":
        streams_ms: dict[Streams, float] = {}
        for name, (streams, _) in runs.items():  # the faster loop form
            streams_ms[streams] = min(medians[name], streams_ms.get(streams, float("inf")))
    else:
        streams_ms = copy_rooflines_ms(modes, numel, device)
    rooflines = rooflines_ms(modes, streams_ms)
    return [Result(m, medians[m.name], rooflines[m.name]) for m in modes]


def clipping_line(results: list[Result]) -> str | None:
    """What clipping adds to the fp32 step, measured, against the least it can add on this
    machine: the grads read once more, at the rate of the faster probe reading them alone, as a
    share of the fp32 step's roofline time. None without the probe's rows (not on the CPU)."""
    by_name = {r.mode.name: r for r in results}
    reads = [by_name[m.name] for m in GRAD_READS if m.name in by_name]
    if not reads:
        return None
    step, clipped = by_name["fastopt fp32"], by_name["fastopt fp32, clipped"]
    norm = by_name["fastopt grad_norm alone (clipping's pass)"]
    least_ms = min(r.ms for r in reads)
    least = least_ms / step.roofline_ms
    reach = "within reach" if least <= CLIPPING_TARGET else "out of reach"
    return (
        f"Clipping adds {clipped.ms - step.ms:.2f} ms to the fp32 step "
        f"({clipped.ms / step.ms - 1:+.0%}); its norm pass alone takes {norm.ms:.2f} ms. The least "
        f"it can add on this machine: the grads read once more, at the rate of the probe reading "
        f"them alone ({least_ms:.2f} ms), {least:.0%} of the fp32 step's roofline time "
        f"({step.roofline_ms:.2f} ms): the target, at most {CLIPPING_TARGET:+.0%}, is {reach} here."
    )


def format_table(results: list[Result]) -> str:
    torch_fp32 = results[0].ms
    lines = [
        "| mode | bytes/param | ms/step | vs torch fused fp32 | share of roofline |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        versus = f"{torch_fp32 / r.ms:.2f}x" if r.mode.is_step else ""
        lines.append(
            f"| {r.mode.name} | {r.mode.bytes_per_param} | {r.ms:.2f} | {versus} | "
            f"{r.roofline_ms / r.ms:.0%} |"
        )
    line = clipping_line(results)
    return "\n".join(lines + ([] if line is None else ["", line]))


def measurements(results: list[Result], numel: int) -> list[Measurement]:
    group = f"AdamW step, {numel / 1e6:g}M params"
    return [
        Measurement(FEATURE, group, r.mode.name, r.ms, r.mode.is_torch)
        for r in results
        if r.mode not in STEP_READS + GRAD_READS  # bounds, not contenders
    ]
