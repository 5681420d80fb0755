"""What every Triton launcher of fastopt shares: the device and stream a launch runs on, and the
CUDA limits on its grid.

Triton launches on the *current* CUDA device and that device's current stream, and
``torch.library`` adds no device guard (the C++ ops take one themselves), so tensors on
``cuda:1`` while ``cuda:0`` is current would be read by a kernel on the wrong device. Each
launcher enters ``device_guard(input.device)`` around its launches: the tensors' device becomes
current, and with it the stream torch has current on that device.
"""

from __future__ import annotations

import contextlib

import torch

# The largest grid CUDA launches: 2**31 - 1 blocks on axis 0, 65535 on axes 1 and 2. The
# dimension that grows with the batch goes on axis 0.
MAX_GRID = (2**31 - 1, 65535, 65535)


def device_guard(device: torch.device) -> contextlib.AbstractContextManager:
    """Makes `device` the current CUDA device for a launch (nothing for a CPU tensor, which only
    the interpreter runs)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def checked_grid(op: str, grid: tuple[int, ...], what: tuple[str, ...]) -> tuple[int, ...]:
    """`grid`, after checking it against CUDA's limits; `what` names each axis for the error."""
    for axis, size in enumerate(grid):
        limit = MAX_GRID[axis]
        if size > limit:
            raise RuntimeError(
                f"fastopt.{op}: {size} {what[axis]} exceed the {limit} blocks CUDA launches on "
                f"grid axis {axis}; split the call into smaller ones"
            )
    return grid
