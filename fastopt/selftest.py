"""`python -m fastopt selftest`: every kernel of every device present, against torch eager.

On small random inputs, each kernel runs beside its torch eager reference and the largest error
is compared with a tolerance for its dtype:
- the optimizer steps against the torch.optim twin (``foreach=False``) run in float64 from the
  same start, three steps, the error measured against the size of the update; fp32 and fp64
  are held to rounding, a low-precision step to the larger of its rounding and twice the error
  of the plain torch run in that same precision;
- the int8 layer against fake quantization with the kernels' rules (per-row and per-channel
  scales, round half to even, exact integer sums), the block-sparse layer (forward and both
  gradients) against a dense float64 matmul with the masked weight.
The CPU kernels are checked under every instruction set this CPU runs; the CUDA kernels (C++
for the optimizers, Triton for the layers) where a GPU is visible and they were built.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fastopt
from fastopt import _extension

# Instruction-set levels, narrowest first; the CPU kernels are checked under each one this
# build knows and this CPU runs.
CPU_ISA_LEVELS = ("baseline", "avx2", "avx512", "avx512_vnni", "amx")
OPTIMIZER_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# Relative error allowed where a kernel rounds once at the end (layers) or per element.
ROUNDING = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.bfloat16: 2**-7,
    torch.float16: 2**-10,
}


@dataclass
class Result:
    kernel: str
    device: str
    dtype: torch.dtype
    error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # NaN fails


def _norm(tensors: list[Tensor]) -> Tensor:
    return sum((t.double() ** 2).sum() for t in tensors).sqrt()


def relative_error(values: list[Tensor], references: list[Tensor]) -> float:
    """||values - references|| / ||references||, all tensors together, in float64."""
    pairs = zip(values, references, strict=True)
    return float(_norm([v.double() - r.double() for v, r in pairs]) / _norm(references))


def update_error(values: list[Tensor], references: list[Tensor], starts: list[Tensor]) -> float:
    """The error of params after some steps, relative to how far the reference moved them: a
    param is much larger than its updates, so its own size would hide a wrong update."""
    moved = [r.double() - s.double() for r, s in zip(references, starts, strict=True)]
    wrong = [v.double() - r.double() for v, r in zip(values, references, strict=True)]
    return float(_norm(wrong) / _norm(moved))


# The update error allowed where the math is right, from rounding the params (of about 0.05,
# moved by about 1e-2 a step) and the state in their dtype.
UPDATE_ROUNDING = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.bfloat16: 5e-2,
    torch.float16: 1e-2,
}


# ---- optimizers ---------------------------------------------------------------------------------

OPTIMIZERS: dict[str, tuple[type, Callable[..., torch.optim.Optimizer], dict]] = {
    "adam_step_ (Adam, amsgrad)": (
        fastopt.FusedAdam,
        torch.optim.Adam,
        {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True},
    ),
    "adam_step_ (AdamW)": (fastopt.FusedAdamW, torch.optim.AdamW, {"lr": 1e-2}),
    "rmsprop_step_ (momentum, centered)": (
        fastopt.FusedRMSprop,
        torch.optim.RMSprop,
        {"lr": 1e-2, "momentum": 0.9, "centered": True, "weight_decay": 0.1},
    ),
    "adagrad_step_": (
        fastopt.FusedAdagrad,
        torch.optim.Adagrad,
        {"lr": 1e-1, "lr_decay": 0.01, "weight_decay": 0.1},
    ),
    "adadelta_step_": (
        fastopt.FusedAdadelta,
        torch.optim.Adadelta,
        {"lr": 1.0, "weight_decay": 0.1},
    ),
}
SHAPES = [(1,), (7,), (4097,), (33, 65)]
STEPS = 3


def _run_optimizer(make, options, starts, grads, dtype, device) -> list[Tensor]:
    params = [nn.Parameter(s.to(device=device, dtype=dtype, copy=True)) for s in starts]
    opt = make(params, **options)
    for step_grads in grads:
        for p, g in zip(params, step_grads, strict=True):
            p.grad = g.to(device=device, dtype=dtype)
        opt.step()
    return [p.detach().double().cpu() for p in params]


def check_optimizer(name: str, device: str, dtype: torch.dtype, gen: torch.Generator) -> Result:
    fused, reference, options = OPTIMIZERS[name]
    # Params small next to 1, so that low-precision ones resolve updates of lr = 1e-2; starts and
    # grads exactly representable in `dtype`, so that the references start where fastopt does.
    starts = [
        (0.05 * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype).double()
        for shape in SHAPES
    ]
    grads = [
        [
            torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()
            for shape in SHAPES
        ]
        for _ in range(STEPS)
    ]

    def torch_twin(ps, **kw):
        return reference(ps, foreach=False, **kw)

    exact = _run_optimizer(torch_twin, options, starts, grads, torch.float64, "cpu")
    got = _run_optimizer(fused, options, starts, grads, dtype, device)
    tolerance = UPDATE_ROUNDING[dtype]
    error = update_error(got, exact, starts)
    if dtype in (torch.bfloat16, torch.float16):
        plain = _run_optimizer(torch_twin, options, starts, grads, dtype, "cpu")
        plain_error = update_error(plain, exact, starts)
        # torch's own run may overflow where fastopt's float32 registers do not (fp16 AdamW's
        # eps underflows to 0): then only the rounding bound holds.
        if math.isfinite(plain_error):
            tolerance = max(tolerance, 2 * plain_error)
    return Result(name, device, dtype, error, tolerance)


def check_sparse_adagrad(device: str, dtype: torch.dtype, gen: torch.Generator) -> Result:
    start = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    rows = torch.randint(0, 50, (40,), generator=gen)  # with repeats: duplicates are summed
    grads = [
        torch.sparse_coo_tensor(
            rows[None],
            torch.randn(40, 8, generator=gen, dtype=torch.float64),
            (50, 8),
            check_invariants=True,
        )
        for _ in range(STEPS)
    ]

    def run(make, run_dtype, run_device):
        p = nn.Parameter(start.to(device=run_device, dtype=run_dtype, copy=True))
        opt = make([p], lr=0.1, lr_decay=0.01)
        for g in grads:
            p.grad = g.to(device=run_device, dtype=run_dtype)
            opt.step()
        return [p.detach().double().cpu()]

    with torch.sparse.check_sparse_tensor_invariants():  # as torch's Adagrad asks callers to say
        exact = run(
            lambda ps, **kw: torch.optim.Adagrad(ps, foreach=False, **kw), torch.float64, "cpu"
        )
    got = run(fastopt.FusedAdagrad, dtype, device)
    error = update_error(got, exact, [start])
    return Result("sparse_adagrad_step_", device, dtype, error, UPDATE_ROUNDING[dtype])


# ---- layers ------------------------------------------------------------------------------------


def _quantize_rows(v: Tensor) -> tuple[Tensor, Tensor]:
    """The kernels' activation quantization: per-row scale max|v| / 127 (1 for a zero row),
    round half to even."""
    amax = v.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.round(v / scale).clamp(-127, 127), scale


def check_int8_linear(
    mode: str, device: str, dtype: torch.dtype, gen: torch.Generator, activation: str = "none"
) -> Result:
    linear = nn.Linear(67, 40, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 67, generator=gen, dtype=torch.float64))
        linear.bias.copy_(torch.randn(40, generator=gen, dtype=torch.float64))
    layer = fastopt.nn.Int8Linear.from_float(linear.to(dtype), mode=mode, activation=activation)
    layer = layer.to(device)
    x = torch.randn(5, 67, generator=gen).to(dtype)
    with torch.no_grad():
        got = layer(x.to(device)).cpu()
    # The reference quantizes the float weight itself (per output channel), not the layer's.
    weight, weight_scale = _quantize_rows(linear.weight.detach().to(dtype).float())
    v = x.float()
    if mode == "dynamic":
        q, row_scale = _quantize_rows(v)
        sums = (q.double() @ weight.double().T).float()  # exact integers, rounded once
        expected = sums * row_scale * weight_scale.T
    else:
        expected = (v.double() @ weight.double().T).float() * weight_scale.T
    expected = expected + linear.bias.detach().to(dtype).float()
    if activation == "gelu":  # the epilogue's GELU, on the float32 output
        expected = torch.nn.functional.gelu(expected)
    expected = expected.to(dtype)
    # Both sides round the same float32 result to `dtype`; weight-only sums in another order.
    tolerance = ROUNDING[dtype] if mode == "dynamic" else max(ROUNDING[dtype], 1e-5)
    error = relative_error([got], [expected])
    suffix = ", gelu" if activation == "gelu" else ""
    return Result(f"int8_linear ({mode}{suffix})", device, dtype, error, tolerance)


def _dense_from_blocks(values: Tensor, layout: Tensor) -> Tensor:
    """W [out, in] from blocks [nnz, B, B] stored in the row-major order of `layout`'s blocks,
    in plain torch (differentiable)."""
    rows, cols = layout.nonzero(as_tuple=True)
    block = values.shape[-1]
    grid = values.new_zeros((*layout.shape, block, block)).index_put((rows, cols), values)
    return grid.permute(0, 2, 1, 3).reshape(layout.shape[0] * block, layout.shape[1] * block)


def check_blocksparse_linear(device: str, dtype: torch.dtype, gen: torch.Generator) -> Result:
    dense = nn.Linear(96, 64, dtype=torch.float64)
    with torch.no_grad():
        dense.weight.copy_(torch.randn(64, 96, generator=gen, dtype=torch.float64))
    layer = fastopt.nn.BlockSparseLinear.from_dense(dense, block_size=16, density=0.5)
    layer = layer.to(device=device, dtype=dtype)
    x = torch.randn(7, 96, generator=gen, dtype=torch.float64)
    grad_out = torch.randn(7, 64, generator=gen, dtype=torch.float64)

    x_fast = x.to(device=device, dtype=dtype).requires_grad_()
    out_fast = layer(x_fast)
    out_fast.backward(grad_out.to(device=device, dtype=dtype))
    got = [out_fast.detach().cpu(), x_fast.grad.cpu(), layer.values.grad.cpu()]

    values = layer.values.detach().cpu().double().requires_grad_()
    x_ref = x_fast.detach().cpu().double().requires_grad_()  # the same (rounded) input
    weight = _dense_from_blocks(values, layer.layout.cpu())
    out = nn.functional.linear(x_ref, weight, layer.bias.detach().cpu().double())
    out.backward(grad_out)
    expected = [out.detach(), x_ref.grad, values.grad]
    # Sums of 96 products accumulated in float32 (float64 for float64), then one rounding to the
    # output's dtype.
    tolerance = ROUNDING[dtype] * (2 if dtype in (torch.bfloat16, torch.float16) else 10)
    error = relative_error(got, expected)
    return Result("blocksparse_linear (+ grads)", device, dtype, error, tolerance)


# ---- devices -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _cpu_isa(level: str) -> Iterator[bool]:
    """Runs the block under instruction set `level`; yields False where this build or CPU
    cannot (the block then checks nothing)."""
    cpu = _extension.cpu_module()
    try:
        previous = cpu.set_cpu_isa(level)
    except ValueError:
        yield False
        return
    try:
        yield True
    finally:
        cpu.set_cpu_isa(previous)


def _checks(device: str) -> list[tuple[Callable[[torch.Generator], Result]]]:
    checks = []
    for name in OPTIMIZERS:
        for dtype in OPTIMIZER_DTYPES:
            checks.append(lambda gen, n=name, d=dtype: check_optimizer(n, device, d, gen))
    for dtype in (torch.float32, torch.float64):
        checks.append(lambda gen, d=dtype: check_sparse_adagrad(device, d, gen))
    layer_dtypes = (torch.float32, torch.bfloat16) + ((torch.float16,) if device != "cpu" else ())
    for mode in ("dynamic", "weight_only"):
        for dtype in layer_dtypes:
            checks.append(lambda gen, m=mode, d=dtype: check_int8_linear(m, device, d, gen))
        checks.append(lambda gen, m=mode: check_int8_linear(m, device, torch.float32, gen, "gelu"))
    for dtype in layer_dtypes:
        checks.append(lambda gen, d=dtype: check_blocksparse_linear(device, d, gen))
    return checks


def run(seed: int = 0) -> tuple[list[Result], list[str]]:
    """Every check on every device present: the results, and a line per device not checked."""
    results, absent = [], []
    if _extension.has_kernels("cpu"):
        for level in CPU_ISA_LEVELS:
            with _cpu_isa(level) as available:
                if not available:
                    absent.append(f"cpu ({level}): not supported by this CPU or build")
                    continue
                # The int8 GEMM's variant (AMX tiles, VNNI, AVX2, portable) per level.
                int8 = f"{level}, int8 {_extension.cpu_module().int8_kernels()}"
                for check in _checks("cpu"):
                    result = check(torch.Generator().manual_seed(seed))
                    is_int8 = result.kernel.startswith("int8")
                    result.device = f"cpu ({int8 if is_int8 else level})"
                    results.append(result)
    else:
        absent.append(f"cpu: {_extension._load_errors.get('cpu')}")
    if not torch.cuda.is_available():
        absent.append("cuda (C++ and Triton kernels): no GPU visible")
    elif not _extension.has_kernels("cuda"):
        absent.append(f"cuda: kernels not loaded: {_extension._load_errors.get('cuda')}")
    else:
        for check in _checks("cuda"):
            result = check(torch.Generator().manual_seed(seed))
            result.device = f"cuda ({torch.cuda.get_device_name()})"
            results.append(result)
    return results, absent


def format_table(results: list[Result]) -> str:
    header = ("kernel", "device", "dtype", "max error", "tolerance", "ok")
    rows = [
        (
            r.kernel,
            r.device,
            str(r.dtype).removeprefix("torch."),
            f"{r.error:.2e}",
            f"{r.tolerance:.2e}",
            "ok" if r.ok else "FAIL",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True))
        for row in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> int:
    """Prints the table and the devices not checked; returns 1 if any check failed."""
    results, absent = run()
    print(format_table(results))
    for line in absent:
        print(f"not checked: {line}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed or not results else 0
