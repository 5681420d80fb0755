"""fastopt's functional API: thin, documented wrappers over the `torch.ops.fastopt.*` ops.

Like `torch.nn.functional`, these hold no state: the optimizer classes in `fastopt.optim` keep
the state and call them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _extension

__all__ = ["adam_step_"]


def adam_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    max_exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One Adam (or, with ``decoupled_weight_decay=True``, AdamW) step over many tensors, in place.

    Computes what ``torch.optim.Adam`` / ``AdamW`` compute (fp32 and fp64 to rounding; bf16 and
    fp16 rounded once per element rather than after every operation), in one pass over memory:
    one parallel region for all tensors on the CPU, multi-tensor launches of up to 320 chunks
    on CUDA.

    Args:
        params, grads, exp_avgs, exp_avg_sqs: one entry per param; each state tensor has its
            param's shape, dtype, device and memory layout. All params are on one device; their
            dtypes (float32, float64, float16, bfloat16) may differ.
        max_exp_avg_sqs: one per param with ``amsgrad=True``, else empty.
        steps: one float32 one-element tensor per param on the params' device, the number of
            steps taken so far; each is incremented.
        lr: the learning rate, a float or a one-element tensor. A CUDA tensor is read from
            device memory, so a captured CUDA graph sees later changes to it; a float or a CPU
            tensor is read when the step is launched (or captured).
        beta1, beta2, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.Adam``; tensor
            betas are read on the host (a sync for CUDA tensors).
        grad_scale: a loss scale to divide the grads by (``torch.amp.GradScaler``); the grads are
            stored back unscaled, as torch's fused optimizers do.
        found_inf: nonzero means an inf/NaN gradient was found: nothing at all is changed.
    """
    if params:
        _extension.require_kernels(params[0].device, "fastopt.functional.adam_step_")
    lr_tensor = lr if isinstance(lr, Tensor) else None
    args = (
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        steps,
        0.0 if lr_tensor is not None else float(lr),
        lr_tensor,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        decoupled_weight_decay,
        amsgrad,
        maximize,
        grad_scale,
        found_inf,
    )
    if _use_eager_fast_path() and _extension.cpu_module().adam_step_eager(*args) is None:
        return
    torch.ops.fastopt.adam_step_(*args)


def _use_eager_fast_path() -> bool:
    """Whether to call the ops without per-tensor boxing (see csrc/eager_calls.cpp); never while
    torch.compile traces, which must see torch.ops calls."""
    return _extension.has_kernels("cpu") and not torch.compiler.is_compiling()
