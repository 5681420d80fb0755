"""The compiled CUDA extension, read with cuobjdump (no GPU needed): every kernel is compiled for
sm_80 and sm_90, uses no local memory (so ptxas spilled no register and made no stack frame), and
the optimizer kernels move param, grad and state with 16-byte loads and stores (LDG.E.128 /
STG.E.128), the accesses their speed rests on."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fastopt import _extension

ARCHS = ("sm_80", "sm_90")
# The CUDA sources of the checkout, by stem (the extension names its objects after them).
SOURCES = sorted(p.stem for p in (Path(__file__).parents[2] / "csrc").glob("**/cuda/*.cu"))


def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, or the copy Triton ships."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    toolkit = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "cuobjdump"
    if toolkit.exists():
        return str(toolkit)
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin is not None:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.exists():
            return str(bundled)
    return None


def _library() -> str:
    if not _extension.has_kernels("cuda"):
        pytest.skip(f"fastopt's CUDA extension is not built: {_extension._load_errors['cuda']}")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's bundled copy)")
    return _extension._loaded["cuda"].__file__


def _run(*args: str) -> str:
    return subprocess.run(
        [_cuobjdump(), *args, _library()], check=True, capture_output=True, text=True
    ).stdout


@functools.cache
def _resource_usage() -> dict[tuple[str, str], dict[str, int]]:
    """(arch, kernel) -> {"REG": ..., "STACK": ..., "LOCAL": ..., ...} for every kernel."""
    usage, arch, function = {}, None, None
    for line in _run("--dump-resource-usage").splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            function = m.group(1)
        elif "REG:" in line:
            usage[(arch, function)] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return usage


@functools.cache
def _sass() -> dict[tuple[str, str], str]:
    """(arch, kernel) -> its SASS."""
    # Lines are gathered in lists and joined once: appending to a string held in a dict copies
    # it every time, quadratic in a kernel's length (one optimizer kernel holds every layout).
    kernels: dict[tuple[str, str], list[str]] = {}
    arch, function = None, None
    for line in _run("--dump-sass").splitlines():
        if m := re.search(r"arch = (sm_\d+)", line):
            arch, function = m.group(1), None
        elif m := re.match(r"\s*Function : (\S+)", line):
            function = m.group(1)
            kernels[(arch, function)] = []
        elif function is not None:
            kernels[(arch, function)].append(line)
    return {key: "\n".join(lines) for key, lines in kernels.items()}


def test_every_source_is_compiled_for_every_target():
    assert SOURCES
    elves = _run("--list-elf")
    for source in SOURCES:
        for arch in ARCHS:
            assert f"{source}.{arch}.cubin" in elves, (source, arch)


# Kernels known to use local memory, by target and a part of their mangled name: some Adagrad
# and RMSprop kernels (which ones depends on the target and on the register allocation of the
# whole kernel) keep 8 to 16 bytes of stack frame around the calls to the IEEE division's and
# square root's slow paths (ptxas: a stack frame, no local memory); the gradient norm's general
# p-norm (norm types other than 1, 2 and inf: NormKind 3) calls double pow, whose slow path takes
# a stack frame. Any other kernel that does fails, and so do these once they no longer do (update
# the list then).
GENERAL_P_NORM = "chunk_values_kernelILNS_8NormKindE3E"
KNOWN_SPILLS = {
    ("sm_90", "StepFunctorINS_11AdagradRuleELi0ELb0E"),
    ("sm_90", "StepFunctorINS_11RmspropRuleELi0ELb0E"),
    ("sm_80", GENERAL_P_NORM),
    ("sm_90", GENERAL_P_NORM),
}


def test_no_kernel_uses_local_memory():
    """No register spills (spill stores go to local memory) and no stack frame, per target,
    except the known ones."""
    usage = _resource_usage()
    assert {arch for arch, _ in usage} >= set(ARCHS)
    spilling = {
        (arch, kernel)
        for (arch, kernel), resources in usage.items()
        if resources["LOCAL"] or resources["STACK"]
    }
    known = {
        (arch, kernel)
        for arch, kernel in usage
        if any(arch == a and part in kernel for a, part in KNOWN_SPILLS)
    }
    assert len(known) == len(KNOWN_SPILLS)
    assert spilling == known


@pytest.mark.parametrize("arch", ARCHS)
def test_optimizer_kernels_use_16_byte_accesses(arch):
    kernels = {k: s for (a, k), s in _sass().items() if a == arch and "multi_tensor_kernel" in k}
    # One per rule and variant (Adam 2, RMSprop 4, Adagrad 1, Adadelta 1), with and without grad
    # scaling; each takes params of every dtype and storage layout.
    assert len(kernels) == 8 * 2, sorted(kernels)
    for kernel, sass in kernels.items():
        assert "LDG.E.128" in sass and "STG.E.128" in sass, kernel
