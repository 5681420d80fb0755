"""FusedAdadelta: a drop-in replacement for torch.optim.Adadelta."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional
from ._base import FusedOptimizer
from ._precision import PrecisionOptions, documented

__all__ = ["FusedAdadelta"]


@documented
class FusedAdadelta(FusedOptimizer):
    """``torch.optim.Adadelta`` computed by fused multi-tensor kernels, one pass over memory a
    step.

    Takes exactly ``torch.optim.Adadelta``'s arguments and produces the same results and the
    same ``state_dict`` (so checkpoints move between the two in both directions), on CPU and CUDA
    params of float32, float64, float16 and bfloat16 (state in the param's dtype). Works with LR
    schedulers and ``torch.amp.GradScaler``, which unscales inside the kernel.

    Args:
        params: params or param groups, as for any torch optimizer.
        lr: coefficient that scales the delta before it is applied (default 1.0); a float or a
            one-element tensor.
        rho: coefficient of the running averages of squared grads and squared deltas.
        eps: added inside the square roots for numerical stability.
        weight_decay: L2 penalty.
        foreach: accepted for compatibility and ignored: the step is always fused.
        capturable: accepted; the CUDA step always reads its step counts (and a CUDA tensor lr)
            from device memory, so it can be captured in a CUDA graph either way.
        maximize: maximize the objective instead of minimizing it.
        differentiable: must be False.

    Example::

        >>> import torch, fastopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fastopt.FusedAdadelta(model.parameters(), max_grad_norm=1.0)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> norm = opt.step()
    """

    _keys_added_later = {
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "capturable": False,
    }

    def __init__(
        self,
        params,
        lr: float | Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        master_weights: bool | str = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            # Recorded as torch records it, so a checkpoint loads into torch.optim.Adadelta.
            "foreach": None,
            "differentiable": differentiable,
        }
        super().__init__(
            params,
            defaults,
            PrecisionOptions(master_weights, state_dtype, max_grad_norm, norm_type),
        )

    def _state_keys(self, group) -> tuple[str, ...]:
        return ("square_avg", "acc_delta")

    def _group_step(self, group, params, grads, states, shared) -> None:
        functional.adadelta_step_(
            params,
            grads,
            states["square_avg"],
            states["acc_delta"],
            states["step"],
            lr=group["lr"],
            rho=group["rho"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            maximize=group["maximize"],
            **shared,
        )
