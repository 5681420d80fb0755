"""What the demo compares, as two tables: the optimizers that train the dense network (one row
each, the first the reference the others' losses are compared with), and the models made from
the network trained by `SOURCE` (converted, some fine-tuned). A new optimizer configuration or a
new model variant is one entry here."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Iterable

import torch
from torch import nn

import fastopt

from .settings import Settings

OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


@dataclasses.dataclass(frozen=True)
class OptimizerVariant:
    """An optimizer configuration that trains the dense network from the common start, with the
    params cast to `param_dtype` first."""

    name: str
    make: OptimizerFactory  # (params, lr) -> optimizer
    param_dtype: torch.dtype = torch.float32


OPTIMIZERS = [
    OptimizerVariant("torch.optim.AdamW", lambda ps, lr: torch.optim.AdamW(ps, lr=lr)),
    OptimizerVariant(
        "torch.optim.AdamW(fused=True)", lambda ps, lr: torch.optim.AdamW(ps, lr=lr, fused=True)
    ),
    OptimizerVariant("fastopt.FusedAdamW", lambda ps, lr: fastopt.FusedAdamW(ps, lr=lr)),
    # bfloat16 training: torch's, and fastopt's with float32 master weights (the remainder form)
    # and bfloat16 moments, clipped in the step.
    OptimizerVariant(
        "torch.optim.AdamW(fused=True), bf16 params",
        lambda ps, lr: torch.optim.AdamW(ps, lr=lr, fused=True),
        torch.bfloat16,
    ),
    OptimizerVariant(
        "fastopt.FusedAdamW, bf16 params, master remainder, bf16 state, clip 1.0",
        lambda ps, lr: fastopt.FusedAdamW(
            ps, lr=lr, master_weights="remainder", state_dtype=torch.bfloat16, max_grad_norm=1.0
        ),
        torch.bfloat16,
    ),
]
REFERENCE = OPTIMIZERS[0].name  # losses and step times are compared with this run's
SOURCE = "fastopt.FusedAdamW"  # the trained network the model variants are made from
FINETUNE = OPTIMIZERS[2]  # fastopt.FusedAdamW fine-tunes the block-sparse model


@dataclasses.dataclass(frozen=True)
class ModelVariant:
    """A model made from the trained dense network by `convert` (which gets a copy), then
    fine-tuned with `FINETUNE` when `finetune` is set."""

    name: str  # may name the settings' fields, as "{density:.0%}"
    convert: Callable[[nn.Module, Settings], nn.Module]
    finetune: bool = False

    def label(self, settings: Settings) -> str:
        return self.name.format(**dataclasses.asdict(settings))


def _divisible(settings: Settings) -> Callable[[nn.Module, str], bool]:
    """Selects the linear layers whose both dimensions the block size divides (not the 10-class
    output layer)."""

    def select(linear: nn.Module, name: str) -> bool:
        return linear.in_features % settings.block_size == 0 and (
            linear.out_features % settings.block_size == 0
        )

    return select


def _block_sparse(model: nn.Module, settings: Settings) -> nn.Module:
    return fastopt.nn.sparsify_(
        model, settings.block_size, settings.density, filter_fn=_divisible(settings)
    )


MODEL_VARIANTS = [
    ModelVariant("block-sparse {density:.0%} (B={block_size}), pruned", _block_sparse),
    ModelVariant(
        "block-sparse {density:.0%} (B={block_size}), fine-tuned", _block_sparse, finetune=True
    ),
    ModelVariant("int8 dynamic (W8A8)", lambda m, s: fastopt.nn.quantize_(m, mode="dynamic")),
    ModelVariant("int8 weight-only", lambda m, s: fastopt.nn.quantize_(m, mode="weight_only")),
]


def convert(variant: ModelVariant, trained: nn.Module, settings: Settings) -> nn.Module:
    """`variant`'s model, made from a copy of `trained` (left as it is)."""
    return variant.convert(copy.deepcopy(trained), settings).eval()
