"""Running code with a given size of torch's CPU thread pool, which is restored afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import pytest
import torch

T = TypeVar("T")


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def at_thread_counts(fn: Callable[[], T], counts: Sequence[int] = (1, 2, 3)) -> list[T]:
    """fn() run once with each thread count: different counts cut work into different pieces."""
    results = []
    for n in counts:
        with num_threads(n):
            results.append(fn())
    return results


@contextmanager
def flushing_denormals() -> Iterator[None]:
    """torch.set_flush_denormal(True) inside the block, set in the calling thread only (as torch
    sets it), cleared after; the test is skipped where the CPU cannot flush subnormals."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush subnormals")
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
