"""The optimizer benchmark: fastopt against torch's fastest Adam paths on the same inputs.

Used by `python -m fastopt bench` and by the pytest-benchmark runs in `benchmarks/`. Every
case runs fastopt and its anchors in one process on the same params, and measures a roofline
for the same bytes on the same machine:
- CPU: `torch.ops.fastopt.adam_traffic_probe_`, a loop with an Adam step's exact memory traffic
  (4 loads, 3 stores per fp32 element) and multiply-adds only;
- CUDA: the device's measured copy bandwidth (`Tensor.copy_` of a large buffer).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fastopt

BYTES_PER_PARAM = 28  # fp32 Adam: param, grad, exp_avg, exp_avg_sq read; three of them written


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.sizes)


def mixed_sizes(total: int, count: int, seed: int = 0) -> tuple[int, ...]:
    """`count` tensor sizes spread log-uniformly over three decades, summing to `total`."""
    rng = random.Random(seed)
    weights = [math.exp(rng.uniform(0.0, math.log(1000.0))) for _ in range(count)]
    scale = total / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    sizes[-1] += total - sum(sizes)
    return tuple(sizes)


CASES = {
    "a": Case("a", "50M params in 300 tensors of mixed sizes", mixed_sizes(50_000_000, 300)),
    "b": Case("b", "2000 tensors of 4096 params", (4096,) * 2000),
    "c": Case("c", "one tensor of 10M params", (10_000_000,)),
}

OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "fastopt.FusedAdam": lambda ps: fastopt.FusedAdam(ps, lr=1e-3),
    "torch Adam(fused=True)": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
    "torch Adam(foreach=True)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
}


def make_params(case: Case, device: str) -> list[torch.Tensor]:
    """fp32 params with random grads, as a model has them after backward()."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for size in case.sizes:
        p = torch.nn.Parameter(torch.randn(size, device=device, generator=gen))
        p.grad = torch.randn(size, device=device, generator=gen)
        params.append(p)
    return params


def _timer(device: str) -> Callable[[Callable[[], object]], float]:
    """Returns time_ms(fn): one call's wall time, the device synchronized around it."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def time_ms(fn: Callable[[], object]) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return (time.perf_counter() - start) * 1e3

    return time_ms


def interleaved_medians(
    contenders: dict[str, Callable[[], object]], device: str, repeats: int = 10, warmup: int = 2
) -> dict[str, float]:
    """Median ms per call of each contender, timed in rounds that call each once, so that the
    machine's drift (a neighbour's load, memory bandwidth) reaches all of them alike."""
    time_ms = _timer(device)
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(time_ms(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_ms(fn: Callable[[], object], device: str, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of `fn` in milliseconds, with the device synchronized around each call."""
    return interleaved_medians({"fn": fn}, device, repeats, warmup)["fn"]


ROOFLINE = "roofline"


def roofline(numel: int, device: str) -> tuple[Callable[[], object], float]:
    """(fn, bytes_per_call) of the roofline for an fp32 Adam step of `numel` params: on the CPU
    the traffic probe over `numel` elements, on CUDA a copy of a buffer larger than any cache."""
    if device == "cpu":
        buffers = [torch.randn(numel) for _ in range(4)]
        return (lambda: torch.ops.fastopt.adam_traffic_probe_(*buffers)), BYTES_PER_PARAM * numel
    src = torch.empty(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def roofline_ms(numel: int, device: str) -> float:
    """The time the roofline takes to move an fp32 Adam step's bytes for `numel` params."""
    fn, nbytes = roofline(numel, device)
    return median_ms(fn, device) * BYTES_PER_PARAM * numel / nbytes


@dataclass
class Row:
    case: Case
    optimizer: str
    ms: float
    roofline_ms: float
    torch_fused_ms: float

    @property
    def gb_per_s(self) -> float:
        return BYTES_PER_PARAM * self.case.numel / self.ms / 1e6

    @property
    def share_of_roofline(self) -> float:
        return self.roofline_ms / self.ms

    @property
    def speedup_vs_torch_fused(self) -> float:
        return self.torch_fused_ms / self.ms


def run_case(case: Case, device: str, repeats: int = 10) -> list[Row]:
    """Times every optimizer of OPTIMIZERS and the roofline, interleaved, on the same params."""
    params = make_params(case, device)
    contenders = {name: make(params).step for name, make in OPTIMIZERS.items()}
    roof_fn, roof_bytes = roofline(case.numel, device)
    contenders[ROOFLINE] = roof_fn
    times = interleaved_medians(contenders, device, repeats)
    roof = times.pop(ROOFLINE) * BYTES_PER_PARAM * case.numel / roof_bytes
    fused = times["torch Adam(fused=True)"]
    return [Row(case, name, ms, roof, fused) for name, ms in times.items()]


def format_table(rows: list[Row]) -> str:
    header = (
        "| case | optimizer | ms/step | GB/s (28 B/param) | vs torch fused | share of roofline |\n"
        "|---|---|---:|---:|---:|---:|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r.case.name}: {r.case.description} | {r.optimizer} | {r.ms:.2f} | "
            f"{r.gb_per_s:.1f} | {r.speedup_vs_torch_fused:.2f}x | {r.share_of_roofline:.0%} |"
        )
    return "\n".join(lines)


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    isa = fastopt._extension.cpu_module().active_cpu_isa()
    return f"CPU, {torch.get_num_threads()} threads, {isa} kernels, torch {torch.__version__}"
