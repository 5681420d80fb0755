"""pytest-benchmark runs of BlockSparseLinear: a 4096 x 4096 weight at densities 10%, 25%, 50%,
blocks of 32 and 64, batches of 512 and 16, forward and forward+backward; fastopt against its
anchors on the same inputs in one process: dense ``F.linear`` and torch's BSR matmul
(``weight.to_sparse_bsr`` times the input, forward only: torch has no CPU gradient of the input
through a BSR matmul).

The cases, contenders and table are shared with `python -m fastopt bench`
(fastopt/benchmarking/blocksparse_linear.py). Run (not part of the default test run):
    python -m pytest benchmarks/test_blocksparse_linear.py --benchmark-group-by=param:case
At the end it prints one table: medians in ms, fastopt's speedup over dense and over torch BSR,
the backward / forward time ratio, and fastopt's GFLOP/s (useful flops: 2 * batch * nnz * B^2 per
product).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from fastopt import benchmarking
from fastopt.benchmarking.blocksparse_linear import (
    CASES,
    FEATURES,
    IMPLS,
    PASSES,
    build_layer,
    case_id,
    format_table,
    runner,
    supports,
)

# (batch, density, block) -> {(impl, pass): median ms}
_RESULTS: dict[tuple[int, float, int], dict[tuple[str, str], float]] = {}


@pytest.fixture(scope="module")
def layers():
    """One layer per (density, block), built once: fastopt's, its dense and its BSR weight."""
    built = {}

    def get(density: float, block: int):
        if (density, block) not in built:
            built[(density, block)] = build_layer(density, block)
        return built[(density, block)]

    return get


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_blocksparse_linear(benchmark, layers, case, impl, pass_):
    batch, density, block = case
    if not supports(impl, pass_):
        pytest.skip("torch has no CPU gradient of the input through a BSR matmul")
    layer, dense, bsr = layers(density, block)
    x = torch.randn(batch, FEATURES)
    run = runner(impl, pass_, layer, dense, bsr, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark.pedantic(run, rounds=11, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    _RESULTS.setdefault(case, {})[(impl, pass_)] = ms
    products = 1 if pass_ == "forward" else 3
    flops = 2 * batch * layer.values.numel() * products
    benchmark.extra_info["GFLOP/s"] = round(flops / ms / 1e6, 1)


class _Summary:
    """Prints the table at the end of the run (a plugin, so that this file needs no conftest)."""

    def pytest_terminal_summary(self, terminalreporter):
        if _RESULTS:
            machine = benchmarking.machine_description("cpu")
            terminalreporter.write_line(f"\nBlockSparseLinear 4096x4096 on {machine}")
            terminalreporter.write_line(format_table(_RESULTS))


@pytest.fixture(scope="module", autouse=True)
def _summary_plugin(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("blocksparse-summary"):
        manager.register(_Summary(), "blocksparse-summary")
