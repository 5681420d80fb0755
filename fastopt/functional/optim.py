"""The optimizer steps of fastopt's functional API: one in-place step over many tensors per
optimizer, made from the op table (`fastopt._step_ops`), and the sparse Adagrad step. The classes
in `fastopt.optim` keep the state and call these."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _dtensor, _extension
from .._step_ops import SHARED_ARGUMENTS_DOC, STEP_OPS, StepOp

__all__ = [op.name for op in STEP_OPS] + ["sparse_adagrad_step_"]


_EXAMPLE_INPUTS = """>>> import torch, fastopt
>>> p, g = torch.randn(3), torch.randn(3)
"""


def _step_function(op: StepOp) -> Callable[..., None]:
    """The functional wrapper of a multi-tensor op: its tensor lists positionally, the rest by
    keyword, with the defaults and the docstring of its table entry."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    own = [
        inspect.Parameter(
            a.name,
            keyword,
            annotation=a.type.__name__,
            default=inspect.Parameter.empty if a.default is None else a.default,
        )
        for a in op.own
    ]
    signature = inspect.Signature(
        [inspect.Parameter(n, positional, annotation="Sequence[Tensor]") for n in op.list_names]
        + [inspect.Parameter("lr", keyword, annotation="float | Tensor")]
        + sorted(own, key=lambda p: p.default is not inspect.Parameter.empty)
        + [
            inspect.Parameter(n, keyword, annotation="Tensor | None", default=None)
            for n in ("grad_scale", "found_inf")
        ]
        + [
            inspect.Parameter("masters", keyword, annotation="Sequence[Tensor | None]", default=()),
            inspect.Parameter("grad_norm", keyword, annotation="Tensor | None", default=None),
            inspect.Parameter("max_grad_norm", keyword, annotation="float | None", default=None),
            inspect.Parameter("rounding_seeds", keyword, annotation="Sequence[int]", default=()),
        ],
        return_annotation="None",
    )
    own_names = {a.name for a in op.own}

    def step(
        *lists,
        lr,
        grad_scale=None,
        found_inf=None,
        masters=(),
        grad_norm=None,
        max_grad_norm=None,
        rounding_seeds=(),
        **given,
    ) -> None:
        # Plain argument handling rather than signature.bind, so torch.compile traces it.
        if len(lists) != len(op.list_names) or set(given) - own_names:
            # Lists passed by keyword, or a wrong call (bind raises the usual TypeError).
            bound = signature.bind(*lists, lr=lr, **given).arguments
            lists = tuple(bound[name] for name in op.list_names)
            given = {a.name: bound[a.name] for a in op.own if a.name in bound}
        own_values = []
        for a in op.own:
            if a.name not in given and a.default is None:
                raise TypeError(f"{op.name}() missing keyword argument: '{a.name}'")
            # Tensor hyperparameters (betas) are read on the host, as torch.optim reads them.
            own_values.append(a.type(given.get(a.name, a.default)))
        if grad_norm is not None and max_grad_norm is None:
            raise TypeError(f"{op.name}(): grad_norm is given without max_grad_norm")
        _call(
            op.name,
            (
                *lists,
                *_lr_arguments(lr),
                *own_values,
                grad_scale,
                found_inf,
                list(masters),
                grad_norm,
                0.0 if max_grad_norm is None else float(max_grad_norm),
                list(rounding_seeds),
            ),
        )

    step.__name__ = step.__qualname__ = op.name
    step.__module__ = __name__
    step.__signature__ = signature
    example = "\n".join(f"    {line}" for line in (_EXAMPLE_INPUTS + op.example).splitlines())
    step.__doc__ = (
        f"{op.summary}\n\nArgs:\n{SHARED_ARGUMENTS_DOC}\n{op.own_doc}\n\nExample::\n\n{example}\n"
    )
    return step


for _op in STEP_OPS:
    globals()[_op.name] = _step_function(_op)


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

    Example::

        >>> import torch, fastopt
        >>> param, state_sum, step = torch.zeros(1000, 4), torch.zeros(1000, 4), torch.zeros(())
        >>> grad = torch.sparse_coo_tensor([[3, 7]], torch.ones(2, 4), (1000, 4))
        >>> fastopt.functional.sparse_adagrad_step_(param, grad, state_sum, step, lr=0.1)
        >>> int(param.ne(0).any(dim=1).sum())  # rows 3 and 7 only
        2
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
    """fastopt._C's eager entry of op `name`, named as the op."""
    return getattr(_extension.cpu_module(), name)
