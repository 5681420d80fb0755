"""The precision modes of an AdamW step against torch's fused AdamW, in bytes per param and ms.

Run alone, it prints one table of interleaved medians measured in this process:
    python benchmarks/test_precision_step.py [--numel 20000000] [--repeats 11]
Under pytest (not part of the default test run): python -m pytest benchmarks/test_precision_step.py

Each mode's roofline is the CPU traffic probe (`torch.ops.fastopt.traffic_probe_`) with the
mode's streams (tensors updated, tensors only read), fp32, scaled to the mode's bytes per param.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import fastopt
from fastopt import benchmarking

NUMEL = 20_000_000
TENSORS = 64  # a model's worth of tensors, of mixed sizes


@dataclass(frozen=True)
class Mode:
    """One way to run an AdamW step: its streams and what it costs per param."""

    name: str
    param_dtype: torch.dtype
    make: Callable[[list[torch.Tensor]], Callable[[], object]]  # params -> one step
    bytes_per_param: int
    updated: int  # streams read and written
    read: int  # streams only read


def _fastopt(**options) -> Callable[[list[torch.Tensor]], Callable[[], object]]:
    return lambda ps: fastopt.FusedAdamW(ps, lr=1e-4, **options).step


def _torch_fused(ps: list[torch.Tensor]) -> Callable[[], object]:
    return torch.optim.AdamW(ps, lr=1e-4, fused=True).step


def _torch_clip_then_fused(ps: list[torch.Tensor]) -> Callable[[], object]:
    opt = torch.optim.AdamW(ps, lr=1e-4, fused=True)

    def step():
        torch.nn.utils.clip_grad_norm_(ps, 1.0)
        opt.step()

    return step


BF16, FP32 = torch.bfloat16, torch.float32
MODES = [
    # bytes: param read+write, grad read, master read+write, each state read+write
    Mode("torch AdamW(fused) fp32", FP32, _torch_fused, 8 + 4 + 16, 3, 1),
    Mode("torch AdamW(fused) bf16", BF16, _torch_fused, 4 + 2 + 8, 3, 1),
    # clip_grad_norm_ reads the grads once for the norm and scales them in place.
    Mode("torch clip_grad_norm_ + AdamW(fused) fp32", FP32, _torch_clip_then_fused, 40, 3, 1),
    Mode("fastopt fp32", FP32, _fastopt(), 28, 3, 1),
    Mode("fastopt fp32, clipped", FP32, _fastopt(max_grad_norm=1.0), 32, 3, 1),
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


def _params(dtype: torch.dtype, numel: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for size in benchmarking.mixed_sizes(numel, TENSORS):
        p = torch.nn.Parameter(torch.randn(size, generator=gen).to(dtype))
        p.grad = torch.randn(size, generator=gen).to(dtype) * 1e-3
        params.append(p)
    return params


def _roofline_ms(mode: Mode, numel: int, repeats: int) -> float:
    updated = [torch.randn(numel) for _ in range(mode.updated)]
    read = [torch.randn(numel) for _ in range(mode.read)]
    probe_ms = benchmarking.median_ms(
        lambda: torch.ops.fastopt.traffic_probe_(updated, read), "cpu", repeats
    )
    return probe_ms * mode.bytes_per_param / (4 * (2 * mode.updated + mode.read))


def run(numel: int = NUMEL, repeats: int = 11) -> str:
    """Times every mode (interleaved rounds) and returns the table."""
    steps = {}
    for mode in MODES:
        step = mode.make(_params(mode.param_dtype, numel))
        step()  # creates the state
        steps[mode.name] = step
    medians = benchmarking.interleaved_medians(steps, "cpu", repeats)
    torch_fp32 = medians[MODES[0].name]
    lines = [
        f"AdamW step, {numel / 1e6:.0f}M params in {TENSORS} tensors, "
        f"{benchmarking.machine_description('cpu')}",
        "| mode | bytes/param | ms/step | vs torch fused fp32 | share of roofline |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in MODES:
        ms = medians[mode.name]
        share = _roofline_ms(mode, numel, repeats) / ms
        lines.append(
            f"| {mode.name} | {mode.bytes_per_param} | {ms:.2f} | {torch_fp32 / ms:.2f}x | "
            f"{share:.0%} |"
        )
    return "\n".join(lines)


@pytest.mark.parametrize("mode", MODES, ids=[m.name for m in MODES])
def test_precision_step(benchmark, mode):
    step = mode.make(_params(mode.param_dtype, NUMEL))
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info["bytes_per_param"] = mode.bytes_per_param
    benchmark.extra_info["GB/s"] = round(mode.bytes_per_param * NUMEL / ms / 1e6, 1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=NUMEL)
    parser.add_argument("--repeats", type=int, default=11)
    arguments = parser.parse_args()
    print(run(arguments.numel, arguments.repeats))
