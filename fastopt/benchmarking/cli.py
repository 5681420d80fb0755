"""`python -m fastopt bench` and `python -m fastopt plot`: every feature's benchmark table in
one run, with the machine's name, and the figure."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import torch

from .. import _extras
from . import (
    blocksparse_linear,
    figure,
    int8_linear,
    int8_peak,
    optimizers,
    precision,
    pytest_json,
)
from .machine import machine_description
from .measurement import Measurement

FEATURES = ("optimizers", "precision", "int8", "blocksparse")
QUICK_OPTIMIZER_CASES = "c"
QUICK_REPEATS = 3


@dataclass(frozen=True)
class Sizes:
    """What one run measures: the optimizer cases, the layers' width, batches and cases."""

    optimizer_cases: list[optimizers.Case]
    sparse_adagrad: bool
    layer_features: int
    int8_batches: list[int]
    blocksparse_cases: list[blocksparse_linear.Case]
    repeats: int
    precision_numel: int


def _sizes(args: argparse.Namespace) -> Sizes:
    if args.tiny:  # for the tests only (hidden from --help): seconds, meaningless numbers
        tiny = optimizers.Case("tiny", "3 small tensors", (100, 7, 4097))
        return Sizes([tiny], False, 64, [1, 3], [(4, 0.25, 16)], 1, 10_000)
    if args.quick:
        cases = [optimizers.CASES[c] for c in QUICK_OPTIMIZER_CASES]
        return Sizes(
            cases,
            False,
            int8_linear.FEATURES,
            int8_linear.QUICK_BATCHES,
            blocksparse_linear.QUICK_CASES,
            QUICK_REPEATS,
            precision.NUMEL // 4,
        )
    return Sizes(
        [optimizers.CASES[c] for c in args.cases],
        True,
        int8_linear.FEATURES,
        int8_linear.BATCHES,
        blocksparse_linear.CASES,
        args.repeats,
        precision.NUMEL,
    )


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument(
        "--features",
        default=",".join(FEATURES),
        help=f"comma-separated, from: {', '.join(FEATURES)} (default: all)",
    )
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    parser.add_argument(
        "--optimizers",
        default=",".join(optimizers.FAMILIES),
        help=f"comma-separated, from: {', '.join(optimizers.FAMILIES)}",
    )
    parser.add_argument(
        "--cases",
        default="".join(optimizers.CASES),
        help="optimizer cases, e.g. 'ab': "
        + "; ".join(f"{c.name}: {c.description}" for c in optimizers.CASES.values()),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run: optimizer case {QUICK_OPTIMIZER_CASES} without sparse Adagrad, "
        f"int8 at batch {' and '.join(map(str, int8_linear.QUICK_BATCHES))}, "
        f"{len(blocksparse_linear.QUICK_CASES)} block-sparse cases, {QUICK_REPEATS} repeats",
    )
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per contender")
    parser.add_argument("--plot", metavar="FILE", help="also write the figure (PNG) to FILE")


def bench(args: argparse.Namespace) -> int:
    features = args.features.split(",")
    unknown = sorted(set(features) - set(FEATURES))
    if unknown:
        raise SystemExit(f"unknown --features {unknown}: choose from {', '.join(FEATURES)}")
    if args.plot:  # before the measurements, not after them
        _extras.require({"matplotlib": "matplotlib"}, "python -m fastopt bench --plot")
    sizes = _sizes(args)
    width = sizes.layer_features
    measured: list[Measurement] = []
    if "optimizers" in features:
        measured += _optimizers(args.device, args.optimizers.split(","), sizes)
    if "precision" in features:
        numel = sizes.precision_numel
        results = precision.run(args.device, numel, sizes.repeats)
        print(
            f"\nAdamW step by precision mode, {numel / 1e6:g}M params in {precision.TENSORS} "
            f"tensors, on {machine_description(args.device)}"
        )
        print(precision.format_table(results))
        measured += precision.measurements(results, numel)
    if "int8" in features:
        results, bandwidth = int8_linear.run(args.device, sizes.int8_batches, sizes.repeats, width)
        print(
            f"\nInt8Linear {width}x{width} on {machine_description(args.device)}; "
            f"memory read bandwidth {bandwidth:.1f} GB/s"
        )
        print(int8_linear.format_table(results, args.device, width))
        if torch.device(args.device).type == "cpu":
            print(int8_peak.ceiling_line())
        measured += int8_linear.measurements(results)
    if "blocksparse" in features:
        # The block-sparse anchors (torch BSR, with its CPU-only gaps) are the CPU's.
        results = blocksparse_linear.run(sizes.blocksparse_cases, sizes.repeats, width)
        print(f"\nBlockSparseLinear {width}x{width}, fp32, on {machine_description('cpu')}")
        print(blocksparse_linear.format_table(results, width))
        measured += blocksparse_linear.measurements(results)
    if args.plot:
        path = figure.plot(measured, args.plot, machine_description(args.device))
        print(f"\nfigure: {path}")
    return 0


def _optimizers(device: str, names: list[str], sizes: Sizes) -> list[Measurement]:
    rows = []
    for name in names:
        family = optimizers.FAMILIES[name]
        for case in sizes.optimizer_cases:
            rows += optimizers.run_case(family, case, device, sizes.repeats)
    print(f"Optimizer steps, fp32, on {machine_description(device)}")
    print(optimizers.format_table(rows))
    sparse = []
    if "adagrad" in names and sizes.sparse_adagrad:
        num_embeddings, dim = 1_000_000, 128
        sparse = optimizers.run_sparse_adagrad(
            num_embeddings, dim, [1024, 4096, 16384], device, sizes.repeats
        )
        print("\nAdagrad with a sparse gradient (nn.Embedding(sparse=True)), fp32")
        print(optimizers.format_sparse_table(sparse, num_embeddings))
    return optimizers.measurements(device, rows, sparse)


def add_plot_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("json", help="the file of pytest --benchmark-json=FILE, run on benchmarks/")
    parser.add_argument("-o", "--output", default="benchmarks.png", help="the PNG to write")
    parser.add_argument(
        "--title", default=None, help="the figure's title (default: the JSON's machine)"
    )


def plot(args: argparse.Namespace) -> int:
    measured, unknown = pytest_json.read(args.json)
    if unknown:
        print(f"left out {len(unknown)} entries of benchmarks the figure does not know: {unknown}")
    title = args.title or _json_machine(args.json)
    print(f"figure: {figure.plot(measured, args.output, title)}")
    return 0


def _json_machine(path: str) -> str:
    """The CPU pytest-benchmark recorded in the JSON (its machine_info)."""
    with open(path) as file:
        info = json.load(file).get("machine_info", {})
    cpu = info.get("cpu", {}).get("brand_raw") or info.get("processor") or "unknown CPU"
    return f"{cpu}, pytest-benchmark"
