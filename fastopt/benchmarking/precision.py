"""The precision modes of an AdamW step (master weights, bfloat16 state, clipping) against
torch's fused AdamW, in bytes per param and ms, for `python -m fastopt bench` and
benchmarks/test_precision_step.py.

Each mode's roofline on the CPU is the traffic probe (`torch.ops.fastopt.traffic_probe_`) with
the mode's streams (tensors updated, tensors only read) in fp32, scaled to the mode's bytes per
param; on CUDA, the device's copy bandwidth (as for the optimizer table).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastopt

from .measurement import Measurement
from .optimizers import Family, mixed_sizes, roofline_ms
from .timing import interleaved_medians

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
    updated: int  # streams read and written
    read: int  # streams only read
    is_step: bool = True  # False for the norm pass alone

    @property
    def is_torch(self) -> bool:
        return self.name.startswith("torch")


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
# Bytes per param: param read and written, grad read, master read and written, each of the two
# moments read and written, in each one's dtype.
MODES = [
    Mode("torch AdamW(fused) fp32", FP32, _torch_fused, 8 + 4 + 16, 3, 1),
    Mode("torch AdamW(fused) bf16", BF16, _torch_fused, 4 + 2 + 8, 3, 1),
    # clip_grad_norm_ reads the grads for the norm, then scales them in place.
    Mode("torch clip_grad_norm_ + AdamW(fused) fp32", FP32, _torch_clip_then_fused, 40, 3, 1),
    Mode("fastopt fp32", FP32, _fastopt(), 28, 3, 1),
    # The norm reads the grads once before the step.
    Mode("fastopt fp32, clipped", FP32, _fastopt(max_grad_norm=1.0), 32, 3, 1),
    # Clipping's own pass, alone: it only reads, at the rate this machine reads one stream per
    # thread, which can be below the rate of the step's mixed streams (the roofline's).
    Mode("fastopt grad_norm alone (clipping's pass)", FP32, _fastopt_norm, 4, 3, 1, False),
    Mode("torch get_total_norm alone", FP32, _torch_norm, 4, 3, 1, False),
    Mode("fastopt fp32 + bf16 state", FP32, _fastopt(state_dtype=BF16), 8 + 4 + 8, 3, 1),
    Mode("fastopt bf16 + fp32 master + fp32 state", BF16, _fastopt(master_weights=True), 30, 4, 1),
    Mode(
        "fastopt bf16 + fp32 master + bf16 state",
        BF16,
        _fastopt(master_weights=True, state_dtype=BF16),
        4 + 2 + 8 + 8,
        4,
        1,
    ),
    Mode(
        "fastopt bf16 + remainder + bf16 state",
        BF16,
        _fastopt(master_weights="remainder", state_dtype=BF16),
        4 + 2 + 4 + 8,
        4,
        1,
    ),
]


def make_params(dtype: torch.dtype, numel: int, device: str) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for size in mixed_sizes(numel, TENSORS):
        p = torch.nn.Parameter(torch.randn(size, generator=gen).to(dtype=dtype, device=device))
        p.grad = (torch.randn(size, generator=gen) * 1e-3).to(dtype=dtype, device=device)
        params.append(p)
    return params


def mode_roofline_ms(mode: Mode, numel: int, device: str) -> float:
    """The roofline's time for the mode's bytes over `numel` params."""
    probe = Family(mode.name, mode.updated, mode.read, {})
    return roofline_ms(probe, numel, device) * mode.bytes_per_param / probe.bytes_per_param


@dataclass(frozen=True)
class Result:
    mode: Mode
    ms: float
    roofline_ms: float


def run(device: str, numel: int = NUMEL, repeats: int = 10) -> list[Result]:
    """Every mode timed in interleaved rounds, one process, with its roofline."""
    steps = {}
    for mode in MODES:
        step = mode.make(make_params(mode.param_dtype, numel, device))
        step()  # creates the state
        steps[mode.name] = step
    medians = interleaved_medians(steps, device, repeats)
    return [Result(m, medians[m.name], mode_roofline_ms(m, numel, device)) for m in MODES]


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
    return "\n".join(lines)


def measurements(results: list[Result], numel: int) -> list[Measurement]:
    group = f"AdamW step, {numel / 1e6:g}M params"
    return [Measurement(FEATURE, group, r.mode.name, r.ms, r.mode.is_torch) for r in results]
