"""FusedAdam and FusedAdamW: drop-in replacements for torch.optim.Adam and torch.optim.AdamW."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import functional
from ._base import FusedOptimizer
from ._precision import PrecisionOptions, documented

__all__ = ["FusedAdam", "FusedAdamW"]


@documented
class FusedAdam(FusedOptimizer):
    """``torch.optim.Adam`` computed by fused multi-tensor kernels, one pass over memory a step.

    Takes exactly ``torch.optim.Adam``'s arguments and produces the same results and the same
    ``state_dict`` (so checkpoints move between the two in both directions), on CPU and CUDA
    params of float32, float64, float16 and bfloat16 (state in the param's dtype, as torch keeps
    it). Works with LR schedulers and ``torch.amp.GradScaler``, which unscales inside the kernel.

    Args:
        params: params or param groups, as for any torch optimizer.
        lr: learning rate, a float or a one-element tensor (default 1e-3).
        betas: coefficients of the running averages of the gradient and its square.
        eps: added to the denominator for numerical stability.
        weight_decay: L2 penalty (decoupled, as AdamW, with ``decoupled_weight_decay=True``).
        amsgrad: use the maximum of past squared-gradient averages (AMSGrad).
        foreach, fused: accepted for compatibility and ignored: the step is always fused.
        maximize: maximize the objective instead of minimizing it.
        capturable: accepted; fastopt's CUDA step always reads its step counts (and a CUDA
            tensor lr) from device memory, so it can be captured in a CUDA graph either way
            (with float betas: tensor betas are read on the host).
        differentiable: must be False.
        decoupled_weight_decay: apply weight decay as AdamW does.

    Example::

        >>> import torch, fastopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fastopt.FusedAdam(model.parameters(), lr=1e-3, weight_decay=0.01)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
        >>> opt.zero_grad()

    With bfloat16 params, float32 master copies, bfloat16 moments and clipping in the step::

        >>> model = torch.nn.Linear(4, 2).bfloat16()
        >>> opt = fastopt.FusedAdam(model.parameters(), master_weights=True,
        ...                         state_dtype=torch.bfloat16, max_grad_norm=1.0)
        >>> model(torch.randn(8, 4).bfloat16()).float().square().mean().backward()
        >>> norm = opt.step()  # the grads' total norm before clipping
        >>> norm.dim(), opt.state[model.weight]["master_param"].dtype
        (0, torch.float32)
    """

    _keys_added_later = {
        "amsgrad": False,
        "maximize": False,
        "foreach": None,
        "capturable": False,
        "differentiable": False,
        "fused": None,
        "decoupled_weight_decay": False,
    }

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        master_weights: bool | str = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not (
            all(isinstance(beta, float) for beta in betas)
            or all(isinstance(beta, Tensor) for beta in betas)
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, Tensor) and beta.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            # Recorded as torch records them, so a checkpoint loads into torch.optim.Adam.
            "foreach": None,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": None,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(
            params,
            defaults,
            PrecisionOptions(master_weights, state_dtype, max_grad_norm, norm_type),
        )

    def _state_keys(self, group) -> tuple[str, ...]:
        if group["amsgrad"]:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def _group_step(self, group, params, grads, states, shared) -> None:
        amsgrad = group["amsgrad"]
        beta1, beta2 = group["betas"]
        functional.adam_step_(
            params,
            grads,
            states["exp_avg"],
            states["exp_avg_sq"],
            states["max_exp_avg_sq"] if amsgrad else [],
            states["step"],
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=amsgrad,
            maximize=group["maximize"],
            **shared,
        )


@documented
class FusedAdamW(FusedAdam):
    """``torch.optim.AdamW`` computed by fused multi-tensor kernels, one pass over memory a step.

    ``FusedAdam`` with decoupled weight decay, taking exactly ``torch.optim.AdamW``'s arguments
    (``weight_decay`` defaults to 0.01) and fastopt's precision options. See :class:`FusedAdam`.

    Example::

        >>> import torch, fastopt
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = fastopt.FusedAdamW(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool | str = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            master_weights=master_weights,
            state_dtype=state_dtype,
            max_grad_norm=max_grad_norm,
            norm_type=norm_type,
        )
