"""Compiles what fastopt's Triton launchers launch, for real GPU targets, without a GPU.

Each launcher is called on small CPU tensors with its kernels replaced by recorders, once per
configuration of ``fastopt.triton.configs`` (and per dtype, TF32 setting and kernel variant);
each recorded launch is then specialized as Triton's JIT would specialize it and compiled for
sm_80 and sm_90, and ptxas's report (registers, spills, stack) and the kernel's shared memory are
returned. Run as a script (``python triton_compile.py [--all] [--jobs N]``, JSON on stdout) in a
process where TRITON_INTERPRET is not set: under the interpreter ``@triton.jit`` gives no compiler.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any, NamedTuple

# ptxas reports only for what it compiles: a fresh cache, so that every kernel is compiled here.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastopt-triton-compile-")
if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("triton_compile.py compiles kernels: run it without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from helpers import cuda as cuda_helpers  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from fastopt.triton import blocksparse, configs, int8_linear  # noqa: E402

# Target: (compute capability, the most shared memory one block may use, in bytes).
TARGETS = {"sm_80": (80, 163 * 1024), "sm_90": (90, 227 * 1024)}

# Per dot kind: the operand dtypes compiled, and torch's TF32 setting that selects it for fp32.
KINDS = {
    "16-bit": ((torch.float16, torch.bfloat16), True),
    "tf32": ((torch.float32,), True),
    "ieee": ((torch.float32,), False),
}
ROWS = range(1, 4097)  # every row count up to past every threshold of configs.py


class Launch(NamedTuple):
    """One launch a launcher made: the kernel, a label saying which case, and its arguments."""

    kernel: Any  # the JITFunction
    label: str
    representative: bool  # compiled in the default test run (the rest with --all)
    config: configs.Config
    args: tuple
    kwargs: dict


def record(module, call: Callable[[], object]) -> list[tuple]:
    """(kernel, args, kwargs) of each launch `call` makes through `module`'s launchers, with the
    kernels replaced by recorders (nothing runs)."""
    launches: list[tuple] = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    kernels = {n: k for n, k in vars(module).items() if isinstance(k, triton.runtime.JITFunction)}
    try:
        for name, kernel in kernels.items():
            setattr(module, name, Recorder(kernel))
        call()
    finally:
        for name, kernel in kernels.items():
            setattr(module, name, kernel)
    return launches


def first_rows(choose: Callable[[int], configs.Config]) -> dict[configs.Config, int]:
    """Each configuration `choose` picks for some number of rows, with the first such number."""
    found: dict[configs.Config, int] = {}
    for rows in ROWS:
        found.setdefault(choose(rows), rows)
    return found


def _blocksparse_launches() -> Iterator[Launch]:
    """Forward and grad_input (the dsd kernel, specialized differently for each) and grad_values
    (the sdd kernel), for every block size, dtype, TF32 setting and configuration. The default
    run compiles the two largest blocks' largest configurations."""
    zero = torch.zeros(1, dtype=torch.long)
    bounds = torch.tensor([0, 1])
    index = (bounds, zero, zero, bounds, zero, zero)  # one block
    for kind, (dtypes, allow_tf32) in KINDS.items():
        for block, dtype in itertools.product(configs.BLOCKSPARSE_BLOCKS, dtypes):
            values = torch.randn(1, block, block).to(dtype)
            bias = torch.randn(block).to(dtype)
            big = block >= configs.BLOCKSPARSE_BLOCKS[-2]
            calls = {
                "forward": (
                    configs.dsd,
                    lambda x, v=values, b=bias: blocksparse.blocksparse_linear(x, v, b, *index),
                ),
                "grad_input": (
                    configs.dsd,
                    lambda x, v=values: blocksparse.blocksparse_linear_grad_input(x, v, *index[3:]),
                ),
                "grad_values": (
                    configs.sdd,
                    lambda x, b=block: blocksparse.blocksparse_linear_grad_values(
                        x, x, zero, zero, b
                    ),
                ),
            }
            for op, (choose, call) in calls.items():
                chosen = first_rows(functools.partial(choose, block, kind))
                largest = max(chosen.values())
                for config, rows in chosen.items():
                    x = torch.randn(rows, block).to(dtype)
                    with cuda_helpers.allow_tf32(allow_tf32):
                        launches = record(blocksparse, lambda c=call, x=x: c(x))
                    label = f"{op} {str(dtype)[6:]} {kind} B={block} rows={rows}"
                    for kernel, args, kwargs in launches:
                        yield Launch(kernel, label, big and rows == largest, config, args, kwargs)


def _int8_launches() -> Iterator[Launch]:
    """int8_mm; int8_linear's row quantization, GEMM and weight-only kernels; for every tile
    configuration, input dtype and quantization step (all of them in the default run), each GEMM
    kernel with and without the GELU epilogue (with it, the largest tile in the default run)."""
    n, k = 48, 40
    packed = torch.zeros(triton.cdiv(n, 16), triton.cdiv(k, 4), 16, 4, dtype=torch.int8)
    compensation = torch.zeros(n, dtype=torch.int32)
    scale = torch.rand(n)
    for config, rows in first_rows(configs.int8_gemm).items():
        a = torch.zeros(rows, k, dtype=torch.int8)
        call = lambda a=a: int8_linear.int8_mm(a, packed, compensation, k)  # noqa: E731
        for kernel, args, kwargs in record(int8_linear, call):
            yield Launch(kernel, f"int8_mm rows={rows}", True, config, args, kwargs)
    for dtype, activation in itertools.product(configs.INT8_DTYPES, ("none", "gelu")):
        name = str(dtype)[6:] + (" gelu" if activation == "gelu" else "")
        chosen = first_rows(configs.int8_gemm)
        for config, rows in chosen.items():
            x = torch.randn(rows, k).to(dtype)
            call = lambda x=x, a=activation: int8_linear.int8_linear(  # noqa: E731
                x, packed, compensation, k, scale, scale.to(x.dtype), None, True, a
            )
            representative = activation == "none" or rows == max(chosen.values())
            for kernel, args, kwargs in record(int8_linear, call):
                if kernel is int8_linear._int8_gemm_kernel:  # the quantization: below
                    label = f"int8_linear w8a8 {name} rows={rows}"
                    yield Launch(kernel, label, representative, config, args, kwargs)
        chosen = first_rows(lambda r, d=dtype: configs.weight_only(d, r))
        for config, rows in chosen.items():
            x = torch.randn(rows, k).to(dtype)
            call = lambda x=x, a=activation: int8_linear.int8_linear(  # noqa: E731
                x, packed, compensation, k, scale, scale.to(x.dtype), None, False, a
            )
            representative = activation == "none" or rows == max(chosen.values())
            for kernel, args, kwargs in record(int8_linear, call):
                label = f"int8_linear weight-only {name} rows={rows}"
                yield Launch(kernel, label, representative, config, args, kwargs)
        if activation == "gelu":  # the quantization kernel has no epilogue
            continue
        for config, features in first_rows(configs.quantize_rows).items():
            x = torch.randn(2, features).to(dtype)
            w = torch.zeros(triton.cdiv(n, 16), triton.cdiv(features, 4), 16, 4, dtype=torch.int8)
            call = lambda x=x, w=w: int8_linear.int8_linear(  # noqa: E731
                x, w, compensation, x.shape[1], scale, None, torch.ones(x.shape[1]), True
            )
            for kernel, args, kwargs in record(int8_linear, call):
                if kernel is int8_linear._quantize_rows_kernel:
                    label = f"quantize_rows {name} K={features}"
                    yield Launch(kernel, label, True, config, args, kwargs)


def every_launch() -> list[Launch]:
    """A launch of every configuration the launchers can choose, by kernel, dtype and variant."""
    return [*_blocksparse_launches(), *_int8_launches()]


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
}


def compile_launch(launch: Launch, target_name: str) -> dict:
    """Compiles `launch` for `target_name` as Triton's JIT would on that GPU; returns ptxas's
    report, the shared memory, and the time taken (or the error)."""
    capability, shared_limit = TARGETS[target_name]
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kernel = launch.kernel
    kwargs = dict(launch.kwargs, debug=False)
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(
        backend, kwargs, bound, specialization, options
    )
    result = dict(
        kernel=kernel.__name__, label=launch.label, target=target_name,
        config=launch.config.launch_options(), shared_limit=shared_limit,
    )  # fmt: skip
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True
            compiled = triton.compile(
                ASTSource(kernel, signature, constexprs, attrs),
                target=target,
                options=options.__dict__,
            )
    except Exception as error:  # reported, and failed, by the test
        result["error"] = f"{type(error).__name__}: {error}"[-3000:]
        return result
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["shared"] = compiled.metadata.shared
    for key, pattern in _PTXAS.items():
        found = pattern.findall(log.getvalue())
        result[key] = max(map(int, found)) if found else None
    result["ptxas"] = log.getvalue()[-2000:]
    return result


def _compile_one(task: tuple[int, str]) -> dict:
    index, target_name = task
    return compile_launch(_LAUNCHES[index], target_name)


_LAUNCHES: list[Launch] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--all", action="store_true", help="every launch, not a subset")
    parser.add_argument("--jobs", type=int, default=2)
    options = parser.parse_args()
    _LAUNCHES.extend(every_launch())
    tasks = [
        (i, target)
        for i, launch in enumerate(_LAUNCHES)
        if options.all or launch.representative
        for target in TARGETS
    ]
    with ProcessPoolExecutor(options.jobs) as pool:
        results = list(pool.map(_compile_one, tasks))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
