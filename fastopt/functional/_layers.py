"""What the layers' ops share: how they reach their kernels and check their arguments, and
F.linear's bias gradient.

On CPU tensors the ops run fastopt's C++ kernels (``fastopt._C``); on CUDA tensors its Triton
kernels (``fastopt.triton.<module>``), registered here lazily: each op's CUDA kernel imports its
launcher module on first call. So ``import fastopt`` never imports Triton (slow to import, and
not needed on the CPU), and a missing or broken Triton is reported when a CUDA tensor first meets
the op, naming it. Both layers register and check their kernels this way.

The argument checks that name the argument and the fix are those of `fastopt._library`, run by
the ops' fakes and Triton launchers, and by `call_checked` on the CPU path.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch
from torch import Tensor

from .. import _extension


def _triton_launchers(module: str, op: str) -> ModuleType:
    """``fastopt.triton.<module>``, or a RuntimeError naming `op` when Triton fails to import."""
    try:
        return importlib.import_module(f"fastopt.triton.{module}")
    except ImportError as error:
        raise RuntimeError(
            f"fastopt.{op}: no fastopt kernels for cuda tensors: the Triton kernels failed to "
            f"import ({error}); install triton"
        ) from error


def triton_kernel(module: str, op: str) -> Callable:
    """The CUDA kernel of ``fastopt::<op>``: the launcher of the same name in
    ``fastopt.triton.<module>``, imported on first call."""

    def kernel(*args):
        return getattr(_triton_launchers(module, op), op)(*args)

    return kernel


def register_triton_kernels(module: str, ops: tuple[str, ...]) -> None:
    """Registers `triton_kernel` as the CUDA kernel of each ``fastopt::<op>``."""
    for op in ops:
        torch.library.register_kernel(f"fastopt::{op}", "cuda", triton_kernel(module, op))


def require_kernels(device: torch.device, op: str, module: str) -> None:
    """Raises a RuntimeError naming ``fastopt.<op>`` and what is missing when tensors on `device`
    have no kernel for it: the C++ extension on the CPU, Triton on CUDA."""
    if device.type == "cuda":
        _triton_launchers(module, op)
    else:
        _extension.require_kernels(device, f"fastopt.{op}")


def call_checked(op: Callable, check: Callable[[], None], *args):
    """``op(*args)``; when its kernel refuses the arguments, the error of `check` (the
    `fastopt._library` checks of the same arguments) in its place, which names the argument and
    the fix where the kernel's own checks only keep memory safe. Checking only on failure keeps
    the Python checks, tens of microseconds, off every call."""
    if torch.compiler.is_compiling():  # the op's fake runs the checks
        return op(*args)
    try:
        return op(*args)
    except RuntimeError as kernel_error:
        error = kernel_error
    check()  # raises the friendly error, if the checks find one
    raise error


def bias_grad(grad_output: Tensor) -> Tensor:
    """F.linear's bias gradient: `grad_output` summed over every dimension but the last, in its
    dtype (differentiable, for double backward)."""
    batch_dims = tuple(range(grad_output.dim() - 1))  # sum(()) would sum every dimension
    return grad_output.sum(batch_dims) if batch_dims else grad_output
