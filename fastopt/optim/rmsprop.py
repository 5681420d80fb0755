"""FusedRMSprop: a drop-in replacement for torch.optim.RMSprop."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional
from ._base import FusedOptimizer
from ._precision import PrecisionOptions, documented

__all__ = ["FusedRMSprop"]


@documented
class FusedRMSprop(FusedOptimizer):
    """``torch.optim.RMSprop`` computed by fused multi-tensor kernels, one pass over memory a step.

    Takes exactly ``torch.optim.RMSprop``'s arguments and produces the same results and the same
    ``state_dict`` (so checkpoints move between the two in both directions), on CPU and CUDA
    params of float32, float64, float16 and bfloat16 (state in the param's dtype). Works with LR
    schedulers and ``torch.amp.GradScaler``, which unscales inside the kernel.

    Args:
        params: params or param groups, as for any torch optimizer.
        lr: learning rate, a float or a one-element tensor (default 1e-2).
        alpha: smoothing constant of the running average of squared grads.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty.
        momentum: momentum factor (a momentum buffer is kept when it is positive).
        centered: normalize by an estimate of the grad's variance (keeps a grad average).
        capturable: accepted; the CUDA step always reads its step counts (and a CUDA tensor lr)
            from device memory, so it can be captured in a CUDA graph either way.
        foreach: accepted for compatibility and ignored: the step is always fused.
        maximize: maximize the objective instead of minimizing it.
        differentiable: must be False.

    Example::

        >>> import torch, fastopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fastopt.FusedRMSprop(model.parameters(), lr=1e-2, momentum=0.9)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    _keys_added_later = {
        "momentum": 0,
        "centered": False,
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "capturable": False,
    }

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum: float = 0,
        centered: bool = False,
        capturable: bool = False,
        foreach: bool | None = None,
        maximize: bool = False,
        differentiable: bool = False,
        *,
        master_weights: bool | str = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= momentum:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "alpha": alpha,
            "eps": eps,
            "centered": centered,
            "weight_decay": weight_decay,
            "capturable": capturable,
            # Recorded as torch records it, so a checkpoint loads into torch.optim.RMSprop.
            "foreach": None,
            "maximize": maximize,
            "differentiable": differentiable,
        }
        super().__init__(
            params,
            defaults,
            PrecisionOptions(master_weights, state_dtype, max_grad_norm, norm_type),
        )

    def _state_keys(self, group) -> tuple[str, ...]:
        keys = ("square_avg",)
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        if group["centered"]:
            keys += ("grad_avg",)
        return keys

    def _group_step(self, group, params, grads, states, shared) -> None:
        momentum, centered = group["momentum"], group["centered"]
        functional.rmsprop_step_(
            params,
            grads,
            states["square_avg"],
            states["momentum_buffer"] if momentum > 0 else [],
            states["grad_avg"] if centered else [],
            states["step"],
            lr=group["lr"],
            alpha=group["alpha"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            momentum=momentum,
            centered=centered,
            maximize=group["maximize"],
            **shared,
        )
