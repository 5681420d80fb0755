"""The optimizer benchmark evicts the caches before every timed call (untimed), so no contender
finds what the one before it left in a large last-level cache."""

from __future__ import annotations

from fastopt.benchmarking import optimizers
from fastopt.benchmarking.timing import interleaved_medians


def test_before_each_runs_before_every_timed_call_only():
    calls = []
    contenders = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    interleaved_medians(
        contenders, "cpu", repeats=3, warmup=1, before_each=lambda: calls.append("-")
    )
    # Warm-up calls first, without eviction; then every timed call right after one.
    assert calls == ["a", "b"] + ["-", "a", "-", "b"] * 3


def test_cpu_eviction_reads_more_than_a_large_last_level_cache():
    assert optimizers.CACHE_EVICTION_BYTES >= 2 * 480 * 2**20
    # It reads a buffer of ones of that size: their sum counts its float32 elements.
    assert int(optimizers.evict_caches("cpu")()) == optimizers.CACHE_EVICTION_BYTES // 4
    assert optimizers.evict_caches("cuda") is None
