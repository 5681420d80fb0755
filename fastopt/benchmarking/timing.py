"""Wall-clock timing shared by every benchmark: medians of calls timed in interleaved rounds,
the device synchronized around each call."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: str | torch.device) -> None:
    """Waits for the work queued on `device` (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _timer(device: str | torch.device) -> Callable[[Callable[[], object]], float]:
    """Returns time_ms(fn): one call's wall time, the device synchronized around it."""

    def time_ms(fn: Callable[[], object]) -> float:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        return (time.perf_counter() - start) * 1e3

    return time_ms


def interleaved_medians(
    contenders: dict[str, Callable[[], object]],
    device: str | torch.device,
    repeats: int = 10,
    warmup: int = 2,
    before_each: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Median ms per call of each contender, timed in rounds that call each once, so that the
    machine's drift (a neighbour's load, memory bandwidth) reaches all of them alike.
    `before_each`, if given, runs untimed before every timed call (e.g. to evict the caches, so
    that no contender finds the tensors the one before it left in a large last-level cache)."""
    time_ms = _timer(device)
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            if before_each is not None:
                before_each()
            times[name].append(time_ms(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def median_ms(
    fn: Callable[[], object], device: str | torch.device, repeats: int = 10, warmup: int = 2
) -> float:
    """Median wall time of `fn` in milliseconds, with the device synchronized around each call."""
    return interleaved_medians({"fn": fn}, device, repeats, warmup)["fn"]
