"""Gradient clipping by global norm: ``fastopt.clip_grad_norm_``, ``torch.nn.utils.clip_grad_norm_``
with the norm of all gradients taken by one fused reduction (``torch.ops.fastopt.grad_norm``):
one pass over memory, in one parallel region on the CPU and without host synchronization on CUDA.
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

from . import _dtensor, _extension

__all__ = ["clip_grad_norm_"]


@torch.no_grad()
def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> Tensor:
    """Clips the gradients of ``parameters`` in place so that their total norm is at most
    ``max_norm``, and returns the total norm before clipping, as
    ``torch.nn.utils.clip_grad_norm_`` does (same arguments, same results).

    The total norm is that of all gradients together, as if concatenated into one vector; each
    gradient is multiplied by ``min(max_norm / (total_norm + 1e-6), 1)``. Parameters without a
    gradient are skipped; a sparse COO gradient counts with its coalesced values. The norm is
    accumulated in float64 whatever the gradients' dtype (on the CPU after summing short runs of
    float32 terms), in one pass over all of them; on CUDA
    nothing waits for the GPU unless ``error_if_nonfinite`` is set. Under FSDP2 (DTensor
    gradients) the norm covers every rank's shards.

    Args:
        parameters: a tensor or an iterable of tensors whose ``.grad`` is clipped.
        max_norm: the largest total norm the gradients keep.
        norm_type: p of the p-norm: any number > 0, or ``float('inf')`` (the largest magnitude).
        error_if_nonfinite: raise a RuntimeError, changing nothing, if the total norm is inf or
            NaN (this reads the norm on the host).
        foreach: how the gradients are multiplied, as in torch: ``None`` uses torch's foreach
            kernels where the device has them, ``True`` requires them, ``False`` avoids them.

    Returns:
        The total norm of the gradients, a 0-dim tensor of the dtype torch returns (the
        gradients' promoted dtype); ``tensor(0.)`` if no parameter has a gradient.

    Example::

        >>> import torch, fastopt
        >>> model = torch.nn.Linear(4, 2)
        >>> model(torch.randn(8, 4)).square().sum().backward()
        >>> norm = fastopt.clip_grad_norm_(model.parameters(), max_norm=1.0)
        >>> clipped = torch.cat([p.grad.flatten() for p in model.parameters()])
        >>> bool(torch.linalg.vector_norm(clipped) <= 1.0)
        True
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and not parameters:
            warnings.warn(
                "`parameters` is an empty generator, no gradient clipping will occur.",
                stacklevel=3,
            )
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm_type = float(norm_type)
    _dtensor.enable()  # DTensor grads (FSDP2): the norm covers every rank's shards
    # Each rank scales its own shards of DTensor grads: no communication, and grads of several
    # meshes (FSDP2 beside tensor parallel), which DTensor's foreach ops cannot take together.
    grouped = _group_tensors_by_device_and_dtype([_dtensor.local_tensors(grads)])
    if foreach:
        for device, _ in grouped:
            if not _device_has_foreach_support(device):
                raise RuntimeError(
                    f"foreach=True was passed, but can't use the foreach API on {device.type} "
                    "tensors"
                )

    total_norm = grad_total_norm(grads, norm_type)
    if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    norm = _dtensor.local_tensors([total_norm])[0]  # the same on every rank
    # Multiplied even by 1: testing the coefficient first would wait for the device.
    coefficient = torch.clamp(float(max_norm) / (norm + 1e-6), max=1.0)
    for (device, _), ([device_grads], _) in grouped.items():
        device_coefficient = coefficient.to(device)
        if (foreach is None and _has_foreach_support(device_grads, device)) or foreach:
            torch._foreach_mul_(device_grads, device_coefficient)
        else:
            for g in device_grads:
                g.mul_(device_coefficient)
    # torch's norm has the gradients' promoted dtype (bfloat16 for bfloat16 gradients); the
    # coefficient above was taken from the more precise float32 one.
    return total_norm.to(functools.reduce(torch.promote_types, (g.dtype for g in grads)))


def grad_total_norm(
    grads: list[Tensor], norm_type: float, grad_scale: Tensor | None = None
) -> Tensor:
    """The norm of all `grads` together (each divided by `grad_scale` first, if given), float32
    or float64, on the first one's device: one fused reduction per device, combined as torch
    combines the norms of its groups."""
    by_device: dict[torch.device, list[Tensor]] = {}
    for g in grads:
        # A sparse COO gradient holds duplicate indices until coalesced; torch's norm sums them.
        by_device.setdefault(g.device, []).append(g.coalesce().values() if g.is_sparse else g)
    norms = []
    for device, tensors in by_device.items():
        _extension.require_kernels(device, "fastopt.clip_grad_norm_")
        _dtensor.enable()  # DTensor gradients (FSDP2): the norm covers every rank's shards
        scale = None if grad_scale is None else grad_scale.to(device, non_blocking=True)
        norms.append(torch.ops.fastopt.grad_norm(tensors, norm_type, scale))
    if len(norms) == 1:
        return norms[0]
    first = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), norm_type)
