"""`python -m fastopt info | selftest | bench | plot | demo` (`--help` says what each does)."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import fastopt
from fastopt import _extension, _extras, demo
from fastopt.benchmarking import cli as benchmarking_cli


def info() -> None:
    """Prints what was built and what this machine runs."""
    build = _extension.build_info()
    print(f"fastopt {fastopt.__version__}")
    print(f"torch {torch.__version__} (fastopt built against {build.get('TORCH_VERSION')})")
    if _extension.has_kernels("cpu"):
        cpu = _extension.cpu_module()
        compiled = (
            "baseline, avx2, avx512, avx512_vnni, amx"
            if platform.machine() == "x86_64"
            else "baseline"
        )
        print(
            f"CPU kernels: {cpu.active_cpu_isa()} in use (widest this CPU supports: "
            f"{cpu.best_cpu_isa()}; compiled: {compiled}) on {platform.machine()}"
        )
        print(f"CPU int8 GEMM: {cpu.int8_kernels()}")
    else:
        print("CPU kernels: not built")
    if build.get("CUDA_BUILT"):
        print(f"CUDA kernels: built for CUDA {build['CUDA_VERSION']}, archs {build['CUDA_ARCHS']}")
    else:
        print("CUDA kernels: not built")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible"
    print(f"GPU: {gpu}")
    try:
        import triton

        print(f"Triton {triton.__version__}")
    except ImportError:
        print("Triton: not installed")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastopt",
        description="fastopt: fused optimizer steps and int8 / block-sparse linear layers.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("info", help="what was built and what this machine runs")
    sub.add_parser(
        "selftest", help="check every kernel of every device present against torch eager"
    )
    bench_parser = sub.add_parser(
        "bench", help="benchmark tables of every feature against torch, with this machine's name"
    )
    benchmarking_cli.add_bench_arguments(bench_parser)
    plot_parser = sub.add_parser(
        "plot", help="the benchmark figure from `pytest benchmarks --benchmark-json=FILE`"
    )
    benchmarking_cli.add_plot_arguments(plot_parser)
    demo_parser = sub.add_parser(
        "demo", help="train, prune and quantize a network on real data: accuracy, speed, figure"
    )
    demo.add_arguments(demo_parser)
    args = parser.parse_args(argv)
    try:
        if args.command == "info":
            info()
            return 0
        if args.command == "selftest":
            from fastopt import selftest

            return selftest.main()
        if args.command == "bench":
            return benchmarking_cli.bench(args)
        if args.command == "plot":
            return benchmarking_cli.plot(args)
        return demo.main(args)
    except _extras.MissingExtra as error:
        print(f"fastopt: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
