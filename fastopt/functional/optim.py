"""The optimizer steps of fastopt's functional API: one in-place step over many tensors per
optimizer. The classes in `fastopt.optim` keep the state and call these."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import _dtensor, _extension

__all__ = [
    "adadelta_step_",
    "adagrad_step_",
    "adam_step_",
    "rmsprop_step_",
    "sparse_adagrad_step_",
]


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
    _call(
        "adam_step_",
        (
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            max_exp_avg_sqs,
            steps,
            *_lr_arguments(lr),
            float(beta1),
            float(beta2),
            float(eps),
            float(weight_decay),
            decoupled_weight_decay,
            amsgrad,
            maximize,
            grad_scale,
            found_inf,
        ),
    )


def rmsprop_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    momentum_buffers: Sequence[Tensor],
    grad_avgs: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    alpha: float,
    eps: float,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One RMSprop step over many tensors, in place: what ``torch.optim.RMSprop`` computes, in
    one pass over memory.

    Args:
        params, grads, square_avgs, steps: as for :func:`adam_step_`.
        momentum_buffers: one per param with ``momentum > 0``, else empty.
        grad_avgs: one per param with ``centered=True``, else empty.
        lr, grad_scale, found_inf: as for :func:`adam_step_`.
        alpha, eps, weight_decay, momentum, centered, maximize: as in ``torch.optim.RMSprop``.
    """
    _call(
        "rmsprop_step_",
        (
            params,
            grads,
            square_avgs,
            momentum_buffers,
            grad_avgs,
            steps,
            *_lr_arguments(lr),
            float(alpha),
            float(eps),
            float(weight_decay),
            float(momentum),
            centered,
            maximize,
            grad_scale,
            found_inf,
        ),
    )


def adagrad_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    state_sums: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One Adagrad step over many tensors with dense grads, in place: what ``torch.optim.Adagrad``
    computes, in one pass over memory. For a sparse grad see :func:`sparse_adagrad_step_`.

    Args:
        params, grads, steps, lr, grad_scale, found_inf: as for :func:`adam_step_`.
        state_sums: the running sums of squared grads, one per param.
        lr_decay, weight_decay, eps, maximize: as in ``torch.optim.Adagrad``.
    """
    _call(
        "adagrad_step_",
        (
            params,
            grads,
            state_sums,
            steps,
            *_lr_arguments(lr),
            float(lr_decay),
            float(weight_decay),
            float(eps),
            maximize,
            grad_scale,
            found_inf,
        ),
    )


def sparse_adagrad_step_(
    param: Tensor,
    grad: Tensor,
    state_sum: Tensor,
    step: Tensor,
    *,
    lr: float | Tensor,
    lr_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One Adagrad step of one param with a sparse COO grad (``nn.Embedding(sparse=True)``), in
    place, touching only the rows present in the grad, with torch's semantics: duplicate
    indices are summed first. Time is proportional to the grad's entries, not the param's size.

    Args:
        param, state_sum: contiguous tensors of one shape, dtype and device.
        grad: a sparse COO tensor of the param's shape and dtype, coalesced or not; with
            ``grad_scale`` its values are stored back unscaled.
        step: a float32 one-element tensor on the param's device, incremented.
        lr, grad_scale, found_inf: as for :func:`adam_step_`.
        lr_decay, eps, maximize: as in ``torch.optim.Adagrad`` (which refuses weight decay with
            sparse grads).
    """
    _extension.require_kernels(param.device, "fastopt.functional.sparse_adagrad_step_")
    _dtensor.enable()  # DTensor args (FSDP2) step their local shards
    torch.ops.fastopt.sparse_adagrad_step_(
        param,
        grad,
        state_sum,
        step,
        *_lr_arguments(lr),
        float(lr_decay),
        float(eps),
        maximize,
        grad_scale,
        found_inf,
    )


def adadelta_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    acc_deltas: Sequence[Tensor],
    steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    rho: float,
    eps: float,
    weight_decay: float = 0.0,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """One Adadelta step over many tensors, in place: what ``torch.optim.Adadelta`` computes,
    in one pass over memory.

    Args:
        params, grads, square_avgs, steps, lr, grad_scale, found_inf: as for :func:`adam_step_`.
        acc_deltas: the running averages of squared updates, one per param.
        rho, eps, weight_decay, maximize: as in ``torch.optim.Adadelta``.
    """
    _call(
        "adadelta_step_",
        (
            params,
            grads,
            square_avgs,
            acc_deltas,
            steps,
            *_lr_arguments(lr),
            float(rho),
            float(eps),
            float(weight_decay),
            maximize,
            grad_scale,
            found_inf,
        ),
    )


def _lr_arguments(lr: float | Tensor) -> tuple[float, Tensor | None]:
    """The schemas' `float lr, Tensor? lr_tensor` pair."""
    return (0.0, lr) if isinstance(lr, Tensor) else (float(lr), None)


def _call(name: str, args: tuple) -> None:
    """Runs torch.ops.fastopt.`name`(*args), a multi-tensor op whose first argument is the
    params: through the eager entry of csrc/eager_calls.cpp where it applies, else torch.ops."""
    params = args[0]
    if not params:  # nothing to do, and no tensor to choose the device's kernel by
        return
    _extension.require_kernels(params[0].device, f"fastopt.functional.{name}")
    if _use_eager_fast_path() and _eager_entry(name)(*args) is None:
        return
    _dtensor.enable()  # DTensor args (FSDP2) step their local shards
    getattr(torch.ops.fastopt, name)(*args)


def _use_eager_fast_path() -> bool:
    """Whether to call the ops without per-tensor boxing (see csrc/eager_calls.cpp); never while
    torch.compile traces, which must see torch.ops calls."""
    return _extension.has_kernels("cpu") and not torch.compiler.is_compiling()


def _eager_entry(name: str):
    """fastopt._C's eager entry of op `name` (adam_step_ -> adam_step_eager)."""
    return getattr(_extension.cpu_module(), f"{name.removesuffix('_')}_eager")
