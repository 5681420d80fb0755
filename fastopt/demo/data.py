"""The demo's data: scikit-learn's handwritten digits (1797 images of 8x8 pixels, 10 classes),
shipped inside the scikit-learn package, so nothing is downloaded at run time."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits

CLASSES = 10
FEATURES = 64
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Digits:
    """A seeded train / test split, pixels scaled to [0, 1]."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load(seed: int, device: str) -> Digits:
    """The digits on `device`, split into 80% train and 20% test by a permutation of `seed`."""
    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(y) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    return Digits(*(t.to(device) for t in (x[train], y[train], x[test], y[test])))
