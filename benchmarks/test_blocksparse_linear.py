"""pytest-benchmark runs of BlockSparseLinear: a 4096 x 4096 weight at densities 10%, 25%, 50%,
blocks of 32 and 64, batches of 512 and 16, forward and forward+backward; fastopt against its
anchors on the same inputs in one process: dense ``F.linear`` and torch's BSR matmul
(``weight.to_sparse_bsr`` times the input, forward only: torch has no CPU gradient of the input
through a BSR matmul).

Run (not part of the default test run):
    python -m pytest benchmarks/test_blocksparse_linear.py --benchmark-group-by=param:case
At the end it prints one table: medians in ms, fastopt's speedup over dense and over torch BSR,
the backward / forward time ratio, and fastopt's GFLOP/s (useful flops: 2 * batch * nnz * B^2 per
product).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from fastopt import benchmarking
from fastopt.nn import BlockSparseLinear

FEATURES = 4096
CASES = [
    (batch, density, block)
    for batch in (512, 16)
    for block in (32, 64)
    for density in (0.1, 0.25, 0.5)
]
IMPLS = ["fastopt", "dense F.linear", "torch BSR"]
PASSES = ["forward", "forward+backward"]

# (batch, density, block) -> {(impl, pass): median ms}
_RESULTS: dict[tuple[int, float, int], dict[tuple[str, str], float]] = {}


def _case_id(case) -> str:
    batch, density, block = case
    return f"batch{batch}-d{density}-B{block}"


@pytest.fixture(scope="module")
def layers():
    """One layer per (density, block), built once: fastopt's, its dense and its BSR weight."""
    built = {}

    def get(density: float, block: int):
        if (density, block) not in built:
            layer = BlockSparseLinear(FEATURES, FEATURES, block_size=block, density=density)
            dense = layer.dense_weight().detach()
            with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state"
                warnings.simplefilter("ignore")
                bsr = dense.to_sparse_bsr((block, block))
            built[(density, block)] = (layer, dense, bsr)
        return built[(density, block)]

    return get


def _runner(impl: str, pass_: str, layer, dense, bsr, x):
    bias = layer.bias.detach()
    if impl == "fastopt":

        def forward(inp):
            return layer(inp)
    elif impl == "dense F.linear":
        weight = dense.clone().requires_grad_()
        bias = bias.clone().requires_grad_()

        def forward(inp):
            return F.linear(inp, weight, bias)
    else:

        def forward(inp):
            return (bsr @ inp.T).T + bias

    if pass_ == "forward":

        def run():
            with torch.no_grad():
                forward(x)
    else:
        xg = x.clone().requires_grad_()

        def run():
            out = forward(xg)
            out.backward(torch.ones_like(out))

    return run


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_blocksparse_linear(benchmark, layers, case, impl, pass_):
    batch, density, block = case
    if impl == "torch BSR" and pass_ != "forward":
        pytest.skip("torch has no CPU gradient of the input through a BSR matmul")
    layer, dense, bsr = layers(density, block)
    x = torch.randn(batch, FEATURES)
    run = _runner(impl, pass_, layer, dense, bsr, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark.pedantic(run, rounds=11, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    _RESULTS.setdefault(case, {})[(impl, pass_)] = ms
    products = 1 if pass_ == "forward" else 3
    flops = 2 * batch * layer.values.numel() * products
    benchmark.extra_info["GFLOP/s"] = round(flops / ms / 1e6, 1)


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def table() -> str:
    """The markdown table of everything measured in this process."""
    lines = [
        "| batch | density | block | pass | fastopt ms | dense ms | torch BSR ms "
        "| vs dense | vs BSR | bwd/fwd | fastopt GFLOP/s |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (batch, density, block), times in _RESULTS.items():
        for pass_ in PASSES:
            fast = times.get(("fastopt", pass_))
            if fast is None:
                continue
            dense = times.get(("dense F.linear", pass_))
            bsr = times.get(("torch BSR", pass_))
            fwd = times.get(("fastopt", "forward"))
            bwd_ratio = "" if pass_ == "forward" else f"{(fast - fwd) / fwd:.2f}" if fwd else ""
            products = 1 if pass_ == "forward" else 3
            gflops = 2 * batch * FEATURES * FEATURES * density * products / fast / 1e6
            lines.append(
                f"| {batch} | {density:.0%} | {block} | {pass_} | {fast:.2f} | "
                f"{dense:.2f} | {f'{bsr:.2f}' if bsr else 'n/a'} | {_ratio(dense, fast)} | "
                f"{_ratio(bsr, fast)} | {bwd_ratio} | {gflops:.0f} |"
                if dense
                else ""
            )
    return "\n".join(line for line in lines if line)


class _Summary:
    """Prints the table at the end of the run (a plugin, so that this file needs no conftest)."""

    def pytest_terminal_summary(self, terminalreporter):
        if _RESULTS:
            machine = benchmarking.machine_description("cpu")
            terminalreporter.write_line(f"\nBlockSparseLinear 4096x4096 on {machine}")
            terminalreporter.write_line(table())


@pytest.fixture(scope="module", autouse=True)
def _summary_plugin(request):
    manager = request.config.pluginmanager
    if not manager.has_plugin("blocksparse-summary"):
        manager.register(_Summary(), "blocksparse-summary")
