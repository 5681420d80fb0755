"""Loads fastopt's compiled kernels and says clearly what is missing when they are not there.

`fastopt._C` holds the CPU kernels and `fastopt._C_cuda` the CUDA kernels; importing either
registers its kernels for the ops defined in `fastopt._library`. Both are checked against the
running torch before they are loaded: a binary built for another torch fails in obscure ways.
"""

from __future__ import annotations

import importlib
import os

import torch

REBUILD = "pip install --no-build-isolation --force-reinstall ."

try:
    from . import _build_info
except ImportError:  # a source checkout that was never built
    _build_info = None

_loaded: dict[str, object] = {}
_load_errors: dict[str, str] = {}


def _check_torch_version() -> None:
    built_for = _build_info.TORCH_VERSION
    if built_for != torch.__version__:
        raise ImportError(
            f"fastopt was built against torch {built_for} but torch {torch.__version__} is "
            f"installed; its kernels must be rebuilt for this torch: run `{REBUILD}` in fastopt's "
            "source folder"
        )


def load() -> None:
    """Loads every extension that was built. Called once, by `import fastopt`."""
    if _build_info is None:
        _load_errors["cpu"] = "fastopt's extensions were never built"
        _load_errors["cuda"] = _load_errors["cpu"]
        return
    _check_torch_version()
    _loaded["cpu"] = _import_binary("fastopt._C")
    if _build_info.CUDA_BUILT:
        try:
            _loaded["cuda"] = _import_binary("fastopt._C_cuda")
        except (ImportError, OSError) as error:
            # The CPU kernels stay usable; CUDA tensors get this reason from require_kernels.
            _load_errors["cuda"] = f"fastopt._C_cuda failed to load ({error})"
    elif torch.version.cuda is None:
        _load_errors["cuda"] = "this torch is a CPU-only build"
    else:
        _load_errors["cuda"] = (
            "fastopt was built without its CUDA kernels (FASTOPT_CUDA=0, or nvcc was not found); "
            "set CUDA_HOME to the CUDA toolkit"
        )


def _import_binary(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        # A non-editable `pip install .` writes _build_info.py into the checkout but puts the
        # binaries in site-packages; Python run from the checkout imports the checkout.
        here = os.path.dirname(os.path.abspath(__file__))
        raise ImportError(
            f"{name} is missing from {here}: this fastopt was imported from a source checkout "
            "whose kernels are not built in place. Build them there with "
            "`pip install --no-build-isolation -e .`, or run Python from another directory to use "
            "the installed fastopt"
        ) from error


def has_kernels(device_type: str) -> bool:
    """Whether fastopt's kernels for `device_type` ("cpu", "cuda") are built and loaded."""
    return device_type in _loaded


def require_kernels(device: torch.device, what: str) -> None:
    """Raises a RuntimeError naming what is missing when `device` has no fastopt kernels."""
    kind = device.type
    if kind in _loaded or kind == "meta":  # meta tensors only trace shapes (torch.compile)
        return
    if kind in _load_errors:
        raise RuntimeError(
            f"{what}: no fastopt kernels for {kind} tensors: {_load_errors[kind]}. "
            f"Rebuild with `{REBUILD}` in fastopt's source folder."
        )
    raise RuntimeError(
        f"{what}: fastopt has kernels for cpu and cuda tensors, not for {kind} ones; "
        "move the model to one of those, or use the torch.optim equivalent"
    )


def cpu_module():
    """The loaded CPU extension, fastopt._C: instruction set queries, and the ops' fast eager
    entry points (csrc/eager_calls.cpp)."""
    require_kernels(torch.device("cpu"), "fastopt")
    return _loaded["cpu"]


def build_info() -> dict[str, object]:
    """What setup.py recorded about the build, or {} for an unbuilt checkout."""
    if _build_info is None:
        return {}
    return {k: v for k, v in vars(_build_info).items() if k.isupper()}
