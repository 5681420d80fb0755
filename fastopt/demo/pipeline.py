"""The demo's steps: train with each optimizer, convert the network to each model variant,
measure accuracy and latency, and hand the numbers to the report."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..benchmarking.timing import interleaved_medians
from . import data as digits
from . import report, variants
from .settings import Settings
from .training import TrainingRun, accuracy, input_dtype, make_model, train


@dataclass
class ModelRow:
    """One line of the demo's table: a model, how it was trained, and what it measured."""

    model: str
    trained_with: str
    accuracy: float
    latency_ms: float = float("nan")
    run: TrainingRun | None = None  # the training (or fine-tuning) run, if any


@dataclass
class DemoResult:
    """What the demo measured: a row per model, the optimizers' training runs, the table and the
    figure's path."""

    settings: Settings
    device: str
    rows: list[ModelRow] = field(default_factory=list)
    runs: dict[str, TrainingRun] = field(default_factory=dict)  # by optimizer
    table: str = ""
    figure: Path | None = None

    def max_loss_difference(self, optimizer: str) -> float:
        """The largest |loss - the reference's loss| over the steps of `optimizer`'s run."""
        reference = self.runs[variants.REFERENCE].losses
        return max(abs(a - b) for a, b in zip(self.runs[optimizer].losses, reference, strict=True))


def run(settings: Settings, device: str, seed: int, out: Path, progress: bool = True) -> DemoResult:
    """Runs every step of the demo and writes the figure and the table into `out`."""
    data = digits.load(seed, device)
    torch.manual_seed(seed)
    initial = make_model(settings.hidden).to(device)
    result = DemoResult(settings, device)
    # The models whose latency is measured, by timing key. The dense networks of one dtype are
    # one architecture: the first of each is timed, and its rows share the time.
    timed: dict[str, nn.Module] = {}
    row_keys: list[str] = []
    trained: nn.Module | None = None
    for variant in variants.OPTIMIZERS:
        model = copy.deepcopy(initial).to(variant.param_dtype)
        optimizer = variant.make(model.parameters(), settings.lr)
        name = variant.name
        result.runs[name] = train(
            model, optimizer, data, settings.epochs, settings.batch_size, seed, name, progress
        )
        key = f"dense {variant.param_dtype}"
        timed.setdefault(key, model)
        row_keys.append(key)
        result.rows.append(ModelRow("dense", name, accuracy(model, data), run=result.runs[name]))
        if name == variants.SOURCE:
            trained = model
    for variant in variants.MODEL_VARIANTS:
        label = variant.label(settings)
        model = variants.convert(variant, trained, settings)
        finetune = None
        trained_with = f"converted from the {variants.SOURCE} network"
        if variant.finetune:
            epochs = settings.finetune_epochs
            trained_with = f"{variants.FINETUNE.name}, {_epochs(epochs)} more"
            optimizer = variants.FINETUNE.make(model.parameters(), settings.lr)
            finetune = train(
                model, optimizer, data, epochs, settings.batch_size, seed + 1, label, progress
            )
        timed[label] = model
        row_keys.append(label)
        result.rows.append(ModelRow(label, trained_with, accuracy(model, data), run=finetune))
    latencies = _latencies(timed, data, settings)
    for row, key in zip(result.rows, row_keys, strict=True):
        row.latency_ms = latencies[key]
    result.table = report.table(result)
    result.figure = report.figure(result, out / "fastopt-demo.png")
    (out / "fastopt-demo.md").write_text(result.table + "\n")
    return result


def _latencies(
    models: dict[str, nn.Module], data: digits.Digits, settings: Settings
) -> dict[str, float]:
    """Median ms of one inference call on `latency_batch` test digits, every model timed in the
    same interleaved rounds."""
    rows = data.x_test[: settings.latency_batch]
    calls = {
        name: functools.partial(_infer, model, rows.to(input_dtype(model)))
        for name, model in models.items()
    }
    return interleaved_medians(calls, rows.device, settings.latency_repeats, warmup=3)


@torch.no_grad()
def _infer(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"
