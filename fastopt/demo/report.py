"""The demo's output: one markdown table and one PNG figure (loss curves; accuracy and latency
per model)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.figure import Figure

from ..benchmarking.machine import machine_description
from . import variants

if TYPE_CHECKING:
    from .pipeline import DemoResult


def _ratio(reference: float, value: float) -> str:
    return f"{reference / value:.2f}x"


def table(result: DemoResult) -> str:
    """The table of every model row, a heading naming the data, the network and the machine, and
    the largest loss difference of each optimizer from the reference run."""
    s = result.settings
    reference = result.rows[0]
    ref_step = reference.run.median_step_ms
    lines = [
        f"Digits (scikit-learn; {s.epochs} epochs, batches of {s.batch_size}), MLP 64-"
        f"{s.hidden}-{s.hidden}-10, on {machine_description(result.device)}",
        "",
        f"| model | trained with | test accuracy | latency ms (batch {s.latency_batch}) | "
        f"latency vs dense | optimizer step ms | step vs {variants.REFERENCE} | last loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result.rows:
        step = loss = step_ratio = ""
        if row.run is not None:
            step = f"{row.run.median_step_ms:.3f}"
            loss = f"{row.run.losses[-1]:.4f}"
            if row.model == reference.model:  # the same network: the step times compare
                step_ratio = _ratio(ref_step, row.run.median_step_ms)
        lines.append(
            f"| {row.model} | {row.trained_with} | {row.accuracy:.2%} | {row.latency_ms:.3f} | "
            f"{_ratio(reference.latency_ms, row.latency_ms)} | {step} | {step_ratio} | {loss} |"
        )
    steps = len(result.runs[variants.REFERENCE].losses)
    lines.append("")
    lines.append(f"Largest loss difference from {variants.REFERENCE} over its {steps} steps:")
    for name in result.runs:
        if name != variants.REFERENCE:
            lines.append(f"- {name}: {result.max_loss_difference(name):.2e}")
    return "\n".join(lines)


def figure(result: DemoResult, path: Path) -> Path:
    """Writes the PNG: the loss of every step of every run (fine-tuning after the dense
    training), and each model's test accuracy and latency. Returns its path."""
    fig = Figure(figsize=(13, 5), layout="constrained")
    losses, accuracy, latency = fig.subplots(1, 3, width_ratios=[1.3, 1, 1])
    for row in result.rows:
        if row.run is None:
            continue
        start = 0 if row.model == "dense" else len(result.runs[variants.REFERENCE].losses)
        steps = range(start, start + len(row.run.losses))
        label = row.trained_with if row.model == "dense" else f"{row.model}"
        style = "--" if row.trained_with == variants.SOURCE else "-"
        losses.plot(steps, row.run.losses, style, label=_wrapped(label), linewidth=1)
    losses.set_yscale("log")
    losses.set_xlabel("optimizer step")
    losses.set_title("training loss (cross-entropy)", fontsize=10)
    # Below the plot: the curves fill the whole axes, and the labels are long.
    losses.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    labels = [_wrapped(_short(row)) for row in result.rows]
    accuracy.barh(labels, [row.accuracy * 100 for row in result.rows], color="tab:green")
    accuracy.set_xlim(left=max(0.0, min(row.accuracy for row in result.rows) * 100 - 10))
    accuracy.set_title("test accuracy (%)", fontsize=10)
    latency.barh(labels, [row.latency_ms for row in result.rows], color="tab:blue")
    for y, row in enumerate(result.rows):
        latency.annotate(
            f"{row.latency_ms:.2f}",
            (row.latency_ms, y),
            xytext=(2, 0),
            textcoords="offset points",
            va="center",
            fontsize=7,
        )
    latency.set_xlim(right=max(row.latency_ms for row in result.rows) * 1.15)  # room for labels
    latency.set_title(f"latency, ms per batch of {result.settings.latency_batch}", fontsize=10)
    for ax in (accuracy, latency):
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
    latency.set_yticklabels([])
    fig.suptitle(f"fastopt demo on {machine_description(result.device)}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    return path


def _wrapped(label: str) -> str:
    """A long label on several lines, so that it does not squeeze the plots."""
    return "\n".join(textwrap.wrap(label, 40))


def _short(row) -> str:
    return f"dense, {row.trained_with}" if row.model == "dense" else row.model
