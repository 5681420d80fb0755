"""Training and evaluation: one loop for every optimizer, the optimizer step timed apart."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..benchmarking.timing import synchronize
from .data import CLASSES, FEATURES, Digits


def make_model(hidden: int) -> nn.Sequential:
    """The demo's MLP: 64 pixels -> hidden -> hidden -> 10 classes."""
    return nn.Sequential(
        nn.Linear(FEATURES, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, CLASSES),
    )


@dataclass
class TrainingRun:
    """The loss of every step and the wall time of every optimizer step."""

    losses: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)

    @property
    def median_step_ms(self) -> float:
        ordered = sorted(self.step_ms)
        return ordered[len(ordered) // 2] if ordered else float("nan")


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Digits,
    epochs: int,
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool = True,
) -> TrainingRun:
    """Cross-entropy training on shuffled minibatches, the order drawn from `seed` (the same for
    every optimizer). `optimizer.step()` is timed alone, the device synchronized around it."""
    device = data.x_train.device
    dtype = next(model.parameters()).dtype
    order = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    steps_per_epoch = -(-n // batch_size)
    run = TrainingRun()
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc=desc, disable=not progress) as bar:
        for _ in range(epochs):
            for batch in torch.randperm(n, generator=order).to(device).split(batch_size):
                loss = F.cross_entropy(model(data.x_train[batch].to(dtype)), data.y_train[batch])
                optimizer.zero_grad()
                loss.backward()
                synchronize(device)
                start = time.perf_counter()
                optimizer.step()
                synchronize(device)
                run.step_ms.append((time.perf_counter() - start) * 1e3)
                run.losses.append(loss.item())
                bar.set_postfix(loss=f"{run.losses[-1]:.4f}", refresh=False)
                bar.update()
    model.eval()
    return run


@torch.no_grad()
def accuracy(model: nn.Module, data: Digits) -> float:
    """The fraction of test digits classified right."""
    dtype = input_dtype(model)
    predicted = model(data.x_test.to(dtype)).argmax(dim=1)
    return (predicted == data.y_test).float().mean().item()


def input_dtype(model: nn.Module) -> torch.dtype:
    """The float dtype the model's first layer takes (an Int8Linear holds int8 buffers and a
    float bias; a float layer's parameters say it)."""
    for tensor in (*model.parameters(), *model.buffers()):
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32
