"""The BlockSparseLinear benchmark: a 4096 x 4096 weight at densities 10%, 25%, 50%, blocks of
32 and 64, batches of 512 and 16, forward and forward+backward; fastopt against its anchors on
the same inputs in one process: dense ``F.linear`` and torch's BSR matmul
(``weight.to_sparse_bsr`` times the input, forward only: torch has no CPU gradient of the input
through a BSR matmul).

The cases, the contenders and the table are shared by `python -m fastopt bench` (interleaved
medians) and `benchmarks/test_blocksparse_linear.py` (pytest-benchmark rounds). The peak a
block-sparse product is held to is the dense GEMM's rate on the same machine (MKL on the CPU):
the table gives both in GFLOP/s (useful flops: 2 * batch * nnz * B^2 per product).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..nn import BlockSparseLinear
from .measurement import Measurement
from .timing import interleaved_medians

FEATURE = "BlockSparseLinear"
FEATURES = 4096
# (batch, density, block)
Case = tuple[int, float, int]
CASES: list[Case] = [
    (batch, density, block)
    for batch in (512, 16)
    for block in (32, 64)
    for density in (0.1, 0.25, 0.5)
]
QUICK_CASES: list[Case] = [(16, 0.25, 32), (512, 0.25, 32)]
FASTOPT, DENSE, BSR = "fastopt", "dense F.linear", "torch BSR"
IMPLS = [FASTOPT, DENSE, BSR]
ANCHORS = (DENSE, BSR)
PASSES = ["forward", "forward+backward"]

# case -> {(impl, pass): median ms}
Results = dict[Case, dict[tuple[str, str], float]]


def case_id(case: Case) -> str:
    batch, density, block = case
    return f"batch{batch}-d{density}-B{block}"


def supports(impl: str, pass_: str) -> bool:
    """Whether `impl` has `pass_`: torch's BSR matmul has no CPU gradient of the input."""
    return not (impl == BSR and pass_ != "forward")


def build_layer(
    density: float, block: int, features: int = FEATURES
) -> tuple[BlockSparseLinear, torch.Tensor, torch.Tensor]:
    """A random-layout layer, its dense weight and that weight as torch BSR."""
    layer = BlockSparseLinear(features, features, block_size=block, density=density)
    dense = layer.dense_weight().detach()
    with warnings.catch_warnings():  # "Sparse BSR tensor support is in beta state"
        warnings.simplefilter("ignore")
        bsr = dense.to_sparse_bsr((block, block))
    return layer, dense, bsr


def runner(
    impl: str,
    pass_: str,
    layer: BlockSparseLinear,
    dense: torch.Tensor,
    bsr: torch.Tensor,
    x: torch.Tensor,
) -> Callable[[], None]:
    """One call of `impl`'s `pass_` on `x` (the backward with a ones gradient)."""
    bias = layer.bias.detach()
    if impl == FASTOPT:

        def forward(inp):
            return layer(inp)
    elif impl == DENSE:
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


def run(cases: list[Case], repeats: int = 11, features: int = FEATURES) -> Results:
    """Every contender of every case on the CPU, each pass timed in interleaved rounds."""
    results: Results = {}
    for case in cases:
        batch, density, block = case
        layer, dense, bsr = build_layer(density, block, features)
        x = torch.randn(batch, features)
        calls = {
            (impl, pass_): runner(impl, pass_, layer, dense, bsr, x)
            for pass_ in PASSES
            for impl in IMPLS
            if supports(impl, pass_)
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            times = interleaved_medians(
                {f"{impl}|{pass_}": call for (impl, pass_), call in calls.items()}, "cpu", repeats
            )
        results[case] = {tuple(key.split("|")): ms for key, ms in times.items()}
    return results


def gflops(case: Case, pass_: str, ms: float, features: int = FEATURES) -> float:
    """Useful GFLOP/s of a pass over the stored blocks (3 products with the backward)."""
    batch, density, _ = case
    products = 1 if pass_ == "forward" else 3
    return 2 * batch * features * features * density * products / ms / 1e6


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def format_table(results: Results, features: int = FEATURES) -> str:
    """The markdown table: medians in ms, fastopt's speedup over dense and over torch BSR, the
    backward / forward time ratio, fastopt's useful GFLOP/s and the rate dense F.linear reaches
    over all of its flops (the peak the block kernels are held to)."""
    lines = [
        "| batch | density | block | pass | fastopt ms | dense ms | torch BSR ms "
        "| vs dense | vs BSR | bwd/fwd | fastopt GFLOP/s | dense GFLOP/s |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, times in results.items():
        batch, density, block = case
        for pass_ in PASSES:
            fast = times.get((FASTOPT, pass_))
            dense = times.get((DENSE, pass_))
            if fast is None or dense is None:
                continue
            bsr = times.get((BSR, pass_))
            fwd = times.get((FASTOPT, "forward"))
            bwd_ratio = "" if pass_ == "forward" or not fwd else f"{(fast - fwd) / fwd:.2f}"
            dense_gflops = gflops((batch, 1.0, block), pass_, dense, features)
            lines.append(
                f"| {batch} | {density:.0%} | {block} | {pass_} | {fast:.2f} | "
                f"{dense:.2f} | {f'{bsr:.2f}' if bsr else 'n/a'} | {_ratio(dense, fast)} | "
                f"{_ratio(bsr, fast)} | {bwd_ratio} | {gflops(case, pass_, fast, features):.0f} "
                f"| {dense_gflops:.0f} |"
            )
    return "\n".join(lines)


def _group(case: Case, pass_: str) -> str:
    batch, density, block = case
    return f"batch {batch}, {density:.0%}, B={block}, {pass_}"


def measurements(results: Results) -> list[Measurement]:
    """The figure's view of `results`: one group per case and pass."""
    return [
        Measurement(FEATURE, _group(case, pass_), impl, ms, impl in ANCHORS)
        for case, times in results.items()
        for (impl, pass_), ms in times.items()
    ]


def measurement_from_pytest(params: dict, ms: float) -> Measurement:
    """The Measurement of one `benchmarks/test_blocksparse_linear.py` entry of a
    --benchmark-json file (its `case` param is stored as a list)."""
    case = tuple(params["case"])
    impl = params["impl"]
    return Measurement(FEATURE, _group(case, params["pass_"]), impl, ms, impl in ANCHORS)
