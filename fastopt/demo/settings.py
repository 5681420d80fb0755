"""How big the demo runs: the network's width, the epochs, the latency measurement."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    """One size of the demo. The network is an MLP 64 -> hidden -> hidden -> 10 (ReLU)."""

    hidden: int  # width of both hidden layers; a multiple of block_size
    epochs: int  # dense training, per optimizer
    finetune_epochs: int  # of the block-sparse model, with fastopt.FusedAdamW
    batch_size: int
    latency_batch: int  # rows per inference call when timing the models
    latency_repeats: int  # interleaved timing rounds
    block_size: int = 32
    density: float = 0.25  # fraction of blocks the block-sparse layers keep
    lr: float = 1e-3


PRESETS = {
    "full": Settings(
        hidden=2048,
        epochs=30,
        finetune_epochs=10,
        batch_size=64,
        latency_batch=64,
        latency_repeats=50,
    ),
    "quick": Settings(
        hidden=2048,
        epochs=6,
        finetune_epochs=3,
        batch_size=64,
        latency_batch=64,
        latency_repeats=20,
    ),
    # For the tests only (`--tiny`, hidden from --help): a few seconds, meaningless numbers.
    "tiny": Settings(
        hidden=64,
        epochs=1,
        finetune_epochs=1,
        batch_size=256,
        latency_batch=8,
        latency_repeats=2,
        block_size=16,
    ),
}
