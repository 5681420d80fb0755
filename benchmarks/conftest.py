"""Collects the medians of a benchmark run and prints fastopt's ratios to its anchors, and the
command that draws the run's figure when it was saved with --benchmark-json."""

from __future__ import annotations

import pytest

from fastopt import benchmarking

_RESULTS: dict[tuple[str, str, str], dict[str, float]] = {}


@pytest.fixture(scope="session")
def measured():
    """(device, family, case) -> {contender or "roofline_ms": median ms}, filled by the
    benchmarks."""
    return _RESULTS


def pytest_terminal_summary(terminalreporter, config):
    saved = getattr(config.option, "benchmark_json", None)
    if saved is not None:
        terminalreporter.write_line(
            f"\nfigure of this run: python -m fastopt plot {saved.name} -o {saved.name}.png"
        )
    for (device, family, case), times in sorted(_RESULTS.items()):
        spec = benchmarking.FAMILIES[family]
        roof = times.get("roofline_ms")
        torch_times = [ms for name, ms in times.items() if name.startswith("torch")]
        if roof is None or not torch_times:
            continue
        rows = [
            benchmarking.Row(spec, benchmarking.CASES[case], name, ms, roof, min(torch_times))
            for name, ms in times.items()
            if name != "roofline_ms"
        ]
        terminalreporter.write_line(
            f"\n{spec.name} step on {benchmarking.machine_description(device)}"
        )
        terminalreporter.write_line(benchmarking.format_table(rows))
