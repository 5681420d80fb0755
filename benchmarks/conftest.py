"""Collects the medians of a benchmark run and prints fastopt's ratios to its anchors."""

from __future__ import annotations

import pytest

from fastopt import benchmarking

_RESULTS: dict[tuple[str, str], dict[str, float]] = {}


@pytest.fixture(scope="session")
def measured():
    """(device, case) -> {optimizer or "roofline_ms": median ms}, filled by the benchmarks."""
    return _RESULTS


def pytest_terminal_summary(terminalreporter):
    for (device, case), times in sorted(_RESULTS.items()):
        fused = times.get("torch Adam(fused=True)")
        roof = times.get("roofline_ms")
        if fused is None or roof is None:
            continue
        rows = [
            benchmarking.Row(benchmarking.CASES[case], name, ms, roof, fused)
            for name, ms in times.items()
            if name != "roofline_ms"
        ]
        terminalreporter.write_line(f"\nAdam step on {benchmarking.machine_description(device)}")
        terminalreporter.write_line(benchmarking.format_table(rows))
