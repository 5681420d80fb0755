"""Seeded random inputs."""

from __future__ import annotations

import torch


def generator(seed: int) -> torch.Generator:
    """A CPU generator: tensors are drawn on the CPU and copied, so every device sees the same."""
    return torch.Generator().manual_seed(seed)
