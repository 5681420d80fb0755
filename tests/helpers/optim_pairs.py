"""Paired params for fastopt and the torch reference, fresh random grads, and the two (or three,
with an fp64 twin) optimizers that step them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

import fastopt
from helpers.optim_cases import SHAPES
from helpers.rng import generator


def make_param_pairs(
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    layout: Callable[[Tensor], Tensor] | None = None,
) -> tuple[list[Tensor], list[Tensor]]:
    """Two lists of leaf params with equal values and strides: (for torch, for fastopt).

    `layout` maps a fresh contiguous tensor to the memory layout wanted (e.g. a transpose).
    """
    gen = generator(seed)
    ref, fast = [], []
    for shape in shapes:
        base = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
        if layout is not None:
            base = layout(base)
        ref.append(base.clone(memory_format=torch.preserve_format).requires_grad_())
        fast.append(base.clone(memory_format=torch.preserve_format).requires_grad_())
        assert ref[-1].stride() == base.stride() == fast[-1].stride()
    return ref, fast


def mixed_dtype_starts(gen: torch.Generator, device: str | torch.device) -> list[Tensor]:
    """Start values for one group of mixed dtypes: fp32, fp64, bf16, fp16 and an empty fp32."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float32]
    shapes = [(7,), (4097,), (33, 65), (4097,), (0,)]
    return [
        torch.randn(s, generator=gen).to(dtype=d, device=device)
        for s, d in zip(shapes, dtypes, strict=True)
    ]


def set_grads(gen: torch.Generator, *param_lists: Sequence[Tensor]) -> list[Tensor]:
    """Gives the i-th param of every list the same fresh grad, in each param's own dtype, device
    and layout. Returns the grads of the first list."""
    grads = []
    for group in zip(*param_lists, strict=True):
        values = torch.randn(group[0].shape, generator=gen, dtype=torch.float64)
        for p in group:
            g = torch.empty_like(p, memory_format=torch.preserve_format)
            g.copy_(values)
            p.grad = g
        grads.append(group[0].grad)
    return grads


def fp64_twin(
    name: str, ref_params: Sequence[Tensor], **kwargs
) -> tuple[torch.optim.Optimizer, list[Tensor]]:
    """torch.optim.`name`(foreach=False, **kwargs) on fp64 copies of `ref_params`: the `exact`
    argument of `step_and_compare` (a Tensor lr is upcast too)."""
    if isinstance(kwargs.get("lr"), Tensor):
        kwargs["lr"] = kwargs["lr"].double()
    exact_params = [p.detach().double().requires_grad_() for p in ref_params]
    return getattr(torch.optim, name)(exact_params, foreach=False, **kwargs), exact_params


def optimizer_pair(
    name: str, ref_params, fast_params, **kwargs
) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
    """torch.optim.`name`(foreach=False) and fastopt.Fused`name` with the same arguments.
    A Tensor lr is cloned, so the two never share it."""
    ref_kwargs = dict(kwargs)
    fast_kwargs = dict(kwargs)
    if isinstance(kwargs.get("lr"), Tensor):
        ref_kwargs["lr"] = kwargs["lr"].clone()
        fast_kwargs["lr"] = kwargs["lr"].clone()
    ref = getattr(torch.optim, name)(ref_params, foreach=False, **ref_kwargs)
    fast = getattr(fastopt, f"Fused{name}")(fast_params, **fast_kwargs)
    return ref, fast
