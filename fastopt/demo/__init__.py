"""`python -m fastopt demo`: fastopt on real data, in one command.

1. Trains one MLP on scikit-learn's handwritten digits (shipped inside the package: nothing is
   downloaded) from one seed with each optimizer of `variants.OPTIMIZERS` (torch.optim.AdamW,
   its fused path, fastopt.FusedAdamW): loss curves, the largest loss difference from
   torch.optim.AdamW, and the median optimizer-step time of each.
2. Prunes the fastopt-trained network's hidden layers to BlockSparseLinear by block magnitude
   (`fastopt.nn.sparsify_`), and fine-tunes it briefly with FusedAdamW.
3. Quantizes it to Int8Linear (`fastopt.nn.quantize_`, dynamic W8A8 and weight-only).
4. Prints one table (accuracy, latency, step times) and writes it with a PNG figure into
   `--out`, printing the figure's path.

Sizes are `settings.PRESETS`: "full" (default), "quick" (`--quick`, under a minute on two CPU
cores) and "tiny" (`--tiny`, hidden from --help: for the tests, seconds, meaningless numbers).
Needs the "demo" extra (scikit-learn, tqdm, matplotlib); without it the command says what to
install.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .. import _extras
from .settings import PRESETS, Settings

__all__ = ["PRESETS", "Settings", "add_arguments", "main", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The demo's command-line options."""
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--quick", action="store_true", help="a short run (under a minute)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0, help="data split, initial weights, order")
    parser.add_argument(
        "--out", type=Path, default=Path("fastopt-demo"), help="folder for the table and figure"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(
    settings: Settings,
    device: str = "cpu",
    seed: int = 0,
    out: Path = Path("fastopt-demo"),
    progress: bool = True,
):
    """Runs the demo at `settings` and returns its `pipeline.DemoResult` (rows, runs, table,
    figure path); raises `fastopt._extras.MissingExtra` naming the pip command if the "demo"
    extra is missing.

        >>> import fastopt.demo
        >>> result = fastopt.demo.run(fastopt.demo.PRESETS["quick"])  # doctest: +SKIP
        >>> print(result.table)  # doctest: +SKIP
    """
    _extras.require(_extras.DEMO, "python -m fastopt demo")
    from . import pipeline

    return pipeline.run(settings, device, seed, Path(out), progress)


def main(args: argparse.Namespace) -> int:
    """`python -m fastopt demo` with parsed `args`: prints the table and the figure's path."""
    preset = "tiny" if args.tiny else "quick" if args.quick else "full"
    result = run(PRESETS[preset], args.device, args.seed, args.out, not args.no_progress)
    print(result.table)
    print(f"\nfigure: {result.figure}\ntable: {Path(args.out) / 'fastopt-demo.md'}")
    return 0
