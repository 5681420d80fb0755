"""The benchmark figure: fastopt's speedup over the fastest anchor of each case, one panel per
feature, from `python -m fastopt bench --plot` or from pytest-benchmark's --benchmark-json
(`python -m fastopt plot results.json`). Needs matplotlib (the "demo" extra)."""

from __future__ import annotations

from pathlib import Path

from .. import _extras
from .measurement import Measurement, speedups

_BAR_INCHES = 0.28
_TICKS = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100]


def plot(measurements: list[Measurement], path: str | Path, title: str) -> Path:
    """Writes a PNG at `path`: for each feature, a horizontal bar per fastopt contender and case,
    its speedup over the fastest anchor measured on the same inputs (log scale, 1x marked).
    Returns the path.

        >>> from fastopt.benchmarking.measurement import Measurement
        >>> runs = [Measurement("optimizer step", "Adam, 10M params", "fastopt.FusedAdam", 7.0,
        ...                     False),
        ...         Measurement("optimizer step", "Adam, 10M params", "torch Adam(fused=True)",
        ...                     7.6, True)]
        >>> plot(runs, "bench.png", "CPU")  # doctest: +SKIP
    """
    _extras.require({"matplotlib": "matplotlib"}, "a benchmark figure")
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ratios = speedups(measurements)
    panels: dict[str, list[tuple[str, float]]] = {}
    for m, ratio in ratios.items():
        if not m.anchor:
            several = sum(1 for o in ratios if o.group == m.group and not o.anchor) > 1
            label = f"{m.group}: {m.contender}" if several else m.group
            panels.setdefault(m.feature, []).append((label, ratio))
    if not panels:
        raise ValueError("no case holds both a fastopt contender and an anchor: nothing to plot")
    heights = [len(bars) * _BAR_INCHES + 0.9 for bars in panels.values()]
    figure = Figure(figsize=(10, sum(heights) + 0.6), layout="constrained")
    figure.suptitle(title, fontsize=10)
    axes = figure.subplots(len(panels), 1, height_ratios=heights, squeeze=False)[:, 0]
    for ax, (feature, bars) in zip(axes, panels.items(), strict=True):
        labels = [label for label, _ in reversed(bars)]
        values = [value for _, value in reversed(bars)]
        colors = ["tab:blue" if v >= 1 else "tab:red" for v in values]
        ax.barh(labels, [v - 1.0 for v in values], left=1.0, color=colors)  # bars start at 1x
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlim(min(0.5, min(values) / 1.3), max(2.0, max(values) * 1.4))
        ax.xaxis.set_major_locator(FixedLocator(_TICKS))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}x"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{feature}: speedup over the fastest anchor (torch) on the same inputs")
        ax.tick_params(axis="y", labelsize=7)
        for y, value in enumerate(values):
            ax.annotate(
                f"{value:.2f}x",
                (max(value, 1.0), y),  # right of the bar, or of the 1x line
                xytext=(3, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    return path
