"""FusedAdagrad: a drop-in replacement for torch.optim.Adagrad, sparse gradients included."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional
from . import _precision
from ._base import FusedOptimizer
from ._precision import PrecisionOptions, documented

__all__ = ["FusedAdagrad"]


@documented
class FusedAdagrad(FusedOptimizer):
    """``torch.optim.Adagrad`` computed by fused kernels, one pass over memory a step.

    Takes exactly ``torch.optim.Adagrad``'s arguments and produces the same results and the same
    ``state_dict`` (so checkpoints move between the two in both directions), on CPU and CUDA
    params of float32, float64, float16 and bfloat16 (state in the param's dtype). Works with LR
    schedulers and ``torch.amp.GradScaler``, which unscales inside the kernel.

    Sparse gradients (``nn.Embedding(..., sparse=True)``) get a fused row update that touches
    only the rows present in the gradient, duplicates summed first as torch does; torch's own
    fused Adagrad has no sparse path. As in torch, ``weight_decay`` cannot be combined with
    them.

    Args:
        params: params or param groups, as for any torch optimizer.
        lr: learning rate, a float or a one-element tensor (default 1e-2).
        lr_decay: learning rate decay: step t uses ``lr / (1 + (t - 1) * lr_decay)``.
        weight_decay: L2 penalty (dense grads only).
        initial_accumulator_value: the starting value of the sums of squared grads.
        eps: added to the denominator for numerical stability.
        foreach, fused: accepted for compatibility and ignored: the step is always fused.
        maximize: maximize the objective instead of minimizing it.
        differentiable: must be False.

    Example::

        >>> import torch, fastopt
        >>> embedding = torch.nn.Embedding(1000, 16, sparse=True)
        >>> opt = fastopt.FusedAdagrad(embedding.parameters(), lr=1e-2)
        >>> embedding(torch.tensor([3, 7, 3])).sum().backward()
        >>> opt.step()  # updates rows 3 and 7 only
    """

    _supports_sparse_grads = True

    _keys_added_later = {
        "foreach": None,
        "maximize": False,
        "differentiable": False,
        "fused": None,
    }

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-2,
        lr_decay: float = 0,
        weight_decay: float = 0,
        initial_accumulator_value: float = 0,
        eps: float = 1e-10,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        master_weights: bool | str = False,
        state_dtype: torch.dtype | None = None,
        max_grad_norm: float | None = None,
        norm_type: float = 2.0,
    ) -> None:
        if not 0.0 <= lr_decay:
            raise ValueError(f"Invalid lr_decay value: {lr_decay}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(
                f"Invalid initial_accumulator_value value: {initial_accumulator_value}"
            )
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        defaults = {
            "lr": lr,
            "lr_decay": lr_decay,
            "eps": eps,
            "weight_decay": weight_decay,
            "initial_accumulator_value": initial_accumulator_value,
            # Recorded as torch records them, so a checkpoint loads into torch.optim.Adagrad.
            "foreach": None,
            "maximize": maximize,
            "differentiable": differentiable,
            "fused": None,
        }
        super().__init__(
            params,
            defaults,
            PrecisionOptions(master_weights, state_dtype, max_grad_norm, norm_type),
        )
        # torch.optim.Adagrad creates its state here rather than at the first step (so that
        # share_memory() can share it before training starts).
        for group in self.param_groups:
            self._states_of(group["params"], group)

    def share_memory(self) -> None:
        """Moves the state sums into shared memory, as ``torch.optim.Adagrad.share_memory``."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _state_keys(self, group) -> tuple[str, ...]:
        return ("sum",)

    def _new_state(self, p: Tensor, group: dict[str, Any], key: str) -> Tensor:
        # The constructor's value, whatever a param group says: torch.optim.Adagrad reads it
        # from self.defaults, and a drop-in must start from the same sums.
        value = self.defaults["initial_accumulator_value"]
        dtype = _precision.state_dtype(p, group)
        return torch.full_like(p, value, dtype=dtype, memory_format=torch.preserve_format)

    def _group_step(self, group, params, grads, states, shared) -> None:
        sparse = [i for i, g in enumerate(grads) if g.is_sparse]
        if sparse and group["weight_decay"] != 0:
            raise RuntimeError("weight_decay option is not compatible with sparse gradients")
        options = dict(lr=group["lr"], eps=group["eps"], maximize=group["maximize"])
        options |= dict(lr_decay=group["lr_decay"])
        columns = (params, grads, states["sum"], states["step"])
        if sparse:  # the dense ones go through the multi-tensor op, the others one by one
            if shared["masters"] or shared["rounding_seeds"]:
                raise RuntimeError(
                    f"{type(self).__name__}: sparse grads are updated in the params' own dtype: "
                    "master_weights and state_dtype are for dense grads; put the params with "
                    "sparse grads (nn.Embedding(sparse=True)) in a param group without them"
                )
            dense = [i for i, g in enumerate(grads) if not g.is_sparse]
            dense_columns = tuple([column[i] for i in dense] for column in columns)
            sparse_scale = _sparse_grad_scale(shared)
        else:
            dense_columns = columns

        has_dense = len(sparse) < len(grads)

        def run_all(found_inf: Tensor | None) -> None:
            for i in sparse:
                functional.sparse_adagrad_step_(
                    *(column[i] for column in columns),
                    grad_scale=sparse_scale,
                    found_inf=found_inf,
                    **options,
                )
            if has_dense:
                functional.adagrad_step_(
                    *dense_columns,
                    weight_decay=group["weight_decay"],
                    **(shared | {"found_inf": found_inf}),
                    **options,
                )

        if len(sparse) + has_dense > 1 and not torch.compiler.is_compiling():
            # Several ops run for this group: all of them first check their inputs as a skipped
            # step (found_inf set), so that a bad input in one leaves the others unchanged too.
            # (One op alone checks everything before it changes anything.)
            run_all(self._skip_flag(params[0].device))
        run_all(shared["found_inf"])


def _sparse_grad_scale(shared) -> Tensor | None:
    """What the sparse step divides the grads by: the loss scale and, with clipping, the clip
    coefficient folded in (the sparse grads are then stored back clipped, as
    ``clip_grad_norm_`` leaves them), computed on the device without a host synchronization.
    The sparse step takes a float32 scale, so the coefficient is rounded to float32 here."""
    grad_scale, grad_norm = shared["grad_scale"], shared.get("grad_norm")
    if grad_norm is None:
        return grad_scale
    coefficient = (shared["max_grad_norm"] / (grad_norm + 1e-6)).clamp(max=1.0).float()
    return coefficient.reciprocal() if grad_scale is None else grad_scale / coefficient
