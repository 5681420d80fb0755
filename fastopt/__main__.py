"""`python -m fastopt info | selftest | bench | demo`."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

import fastopt
from fastopt import _extension


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


def bench(device: str, optimizers: list[str], cases: list[str], repeats: int) -> None:
    """Prints the optimizer benchmark tables (see fastopt.benchmarking)."""
    from fastopt import benchmarking

    rows = []
    for optimizer in optimizers:
        family = benchmarking.FAMILIES[optimizer]
        for name in cases:
            rows += benchmarking.run_case(family, benchmarking.CASES[name], device, repeats)
    print(f"Optimizer steps, fp32, on {benchmarking.machine_description(device)}")
    print(benchmarking.format_table(rows))
    if "adagrad" in optimizers:
        num_embeddings, dim = 1_000_000, 128
        sparse = benchmarking.run_sparse_adagrad(
            num_embeddings, dim, [1024, 4096, 16384], device, repeats
        )
        print("\nAdagrad with a sparse gradient (nn.Embedding(sparse=True)), fp32")
        print(benchmarking.format_sparse_table(sparse, num_embeddings))


def demo(device: str) -> None:
    """Trains a small MLP with torch.optim.AdamW and fastopt.FusedAdamW from the same start."""
    torch.manual_seed(0)
    x = torch.randn(2048, 64, device=device)
    y = torch.sin(x.sum(dim=1, keepdim=True))

    def train(make_opt):
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)
        ).to(device)
        opt = make_opt(model.parameters())
        losses = []
        for _ in range(200):
            loss = torch.nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    ref = train(lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False))
    fused = train(lambda ps: fastopt.FusedAdamW(ps, lr=1e-3))
    print("step | torch.optim.AdamW loss | fastopt.FusedAdamW loss")
    for step in (0, 50, 100, 150, 199):
        print(f"{step:4d} | {ref[step]:.6f} | {fused[step]:.6f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastopt", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="what was built and what this machine runs")
    sub.add_parser(
        "selftest", help="check every kernel of every device present against torch eager"
    )
    bench_parser = sub.add_parser("bench", help="the optimizer benchmark table")
    bench_parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    bench_parser.add_argument(
        "--optimizers",
        default="adam,rmsprop,adagrad,adadelta",
        help="comma-separated, from: adam, rmsprop, adagrad, adadelta",
    )
    bench_parser.add_argument("--cases", default="abc", help="which cases, e.g. 'ab'")
    bench_parser.add_argument("--repeats", type=int, default=10)
    demo_parser = sub.add_parser(
        "demo", help="train a small model with torch's and fastopt's AdamW"
    )
    demo_parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args(argv)
    if args.command == "info":
        info()
    elif args.command == "selftest":
        from fastopt import selftest

        return selftest.main()
    elif args.command == "bench":
        bench(args.device, args.optimizers.split(","), list(args.cases), args.repeats)
    else:
        demo(args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
