"""On AVX-512 the CPU step runs its element code on 16 float lanes at a time, on AVX2 on 8,
vectorized by hand (csrc/optim/cpu/step_lanes.h); the baseline level runs the compiler's
vectorization of the same scalar element code. Each hand-vectorized level must step as the
baseline level does: every optimizer, every storage layout a user can ask for, sizes around the
vector and prefetch-block widths (8, 16 and 64), special values, GradScaler's unscaling and
clipping inside the step. Their arithmetic may differ by the multiply-adds each level compiles to
one fused instruction (the baseline level has none), so whole steps compare to rounding; the
lanes' conversions compare bit for bit with the scalar ones (step_lanes_bits.cpp)."""

from __future__ import annotations

import contextlib
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers.cpu_isa import supported_cpu_isas
from helpers.optim_cases import RICH
from helpers.rng import generator
from helpers.tolerances import FP32 as FP32_CLOSE
from helpers.tolerances import ulp
from torch.utils.cpp_extension import include_paths

import fastopt
from fastopt import _extension

# Each hand-vectorized level and the compiler-vectorized level it is compared with.
LEVEL_PAIRS = [
    pytest.param(
        ("avx512", "baseline"),
        id="avx512-lanes",
        marks=pytest.mark.skipif("avx512" not in supported_cpu_isas(), reason="needs AVX-512"),
    ),
    pytest.param(
        ("avx2", "baseline"),
        id="avx2-lanes",
        marks=pytest.mark.skipif("avx2" not in supported_cpu_isas(), reason="needs AVX2"),
    ),
]

REPO = Path(__file__).resolve().parents[2]

# Empty, a lone element, partial vectors, whole vectors (of 8 and 16 lanes), a prefetch block and
# one past it, more; and enough in all for two threads, which split the last tensor at an element
# that is no multiple of a vector or block of it (a piece that starts inside a tensor).
SIZES = [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 127, 1100, 70001]

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# Param dtype and precision options: each storage layout of csrc/optim/step_storage.h that the
# optimizers make, but float64's (which has no lanes form).
PRECISIONS = [
    pytest.param(FP32, {}, id="fp32"),
    pytest.param(FP32, dict(state_dtype=BF16), id="fp32-bf16state"),
    pytest.param(FP16, {}, id="fp16"),
    pytest.param(FP16, dict(state_dtype=FP32), id="fp16-fp32state"),
    pytest.param(FP16, dict(master_weights=True), id="fp16-master"),
    pytest.param(FP16, dict(master_weights=True, state_dtype=BF16), id="fp16-master-bf16state"),
    pytest.param(BF16, {}, id="bf16"),
    pytest.param(BF16, dict(state_dtype=FP32), id="bf16-fp32state"),
    pytest.param(BF16, dict(state_dtype=BF16), id="bf16-bf16state"),
    pytest.param(BF16, dict(master_weights=True), id="bf16-master"),
    pytest.param(BF16, dict(master_weights=True, state_dtype=BF16), id="bf16-master-bf16state"),
    pytest.param(BF16, dict(master_weights="remainder"), id="bf16-remainder"),
    pytest.param(
        BF16, dict(master_weights="remainder", state_dtype=BF16), id="bf16-remainder-bf16state"
    ),
]

OPTIMIZERS = [
    pytest.param("Adam", RICH["Adam"], id="Adam-amsgrad"),
    pytest.param("Adam", dict(lr=0.01, maximize=True), id="Adam-maximize"),
    pytest.param("AdamW", RICH["AdamW"], id="AdamW-amsgrad"),
    pytest.param("RMSprop", RICH["RMSprop"], id="RMSprop-centered-momentum"),
    pytest.param("RMSprop", dict(lr=0.01), id="RMSprop"),
    pytest.param("Adagrad", RICH["Adagrad"], id="Adagrad"),
    pytest.param("Adadelta", RICH["Adadelta"], id="Adadelta"),
]


@contextlib.contextmanager
def cpu_isa(name: str):
    module = _extension.cpu_module()
    previous = module.set_cpu_isa(name)
    try:
        yield
    finally:
        module.set_cpu_isa(previous)


@contextlib.contextmanager
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def with_special_values(values: torch.Tensor) -> torch.Tensor:
    """`values` with zeros of both signs, a subnormal, an infinity and a NaN spread over it."""
    values = values.clone()
    specials = [0.0, -0.0, 1e-40, -3e-39, math.inf, math.nan]
    for k, value in enumerate(specials):
        values[(k * 37 + 5) % values.numel()] = value
    values[-1] = math.nan  # in the last, masked vector (16 lanes) or the scalar tail (8 lanes)
    return values


def starts(dtype: torch.dtype, seed: int, specials: bool) -> list[torch.Tensor]:
    gen = generator(seed)
    tensors = [torch.randn(n, generator=gen) for n in SIZES]
    if specials:
        tensors = [with_special_values(t) if t.numel() > 64 else t for t in tensors]
    return [t.to(dtype) for t in tensors]


def state_tensors(opt, params):
    """Every tensor of the optimizer's state (step counts, moments, master copies, seeds)."""
    return [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor)]


def step_under_each_isa(levels, name, options, dtype, precision, check, steps=3, scaler_scale=None):
    """Takes `steps` steps; each one from the same params, state and grads under the two levels
    (the hand-vectorized one, the compiler-vectorized one), calling check(lanes, compilers) with
    (params, grads, optimizer state) after each, then going on from the compiler's loop's result.
    Under a GradScaler, no special values (an inf or NaN grad would skip the step)."""
    params = [p.requires_grad_() for p in starts(dtype, seed=1, specials=False)]
    torch.manual_seed(0)  # the stochastic rounding seeds drawn when the state is made
    opt = getattr(fastopt, f"Fused{name}")(params, **options, **precision)
    for p in params:  # a first step, with zero grads, makes the state to save and restore
        p.grad = torch.zeros_like(p)
    opt.step()
    for step in range(steps):
        # Special values in the last step's grads only: a NaN grad makes its element's param and
        # state NaN, which the next steps would carry everywhere it is read.
        last = step == steps - 1
        grads = starts(dtype, seed=100 + step, specials=last and scaler_scale is None)
        before = [t.clone() for t in params + state_tensors(opt, params)]
        after = {}
        for isa in levels:
            for t, saved in zip(params + state_tensors(opt, params), before, strict=True):
                t.data.copy_(saved)
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone() if scaler_scale is None else g * scaler_scale
            with cpu_isa(isa), two_threads():
                if scaler_scale is None:
                    opt.step()
                else:
                    scaler = torch.amp.GradScaler("cpu", init_scale=scaler_scale)
                    scaler.scale(torch.zeros(()))  # GradScaler makes its scale on first use
                    scaler.step(opt)
            after[isa] = (
                [p.detach().clone() for p in params],
                [p.grad.clone() for p in params],
                [{k: _clone(v) for k, v in opt.state[p].items()} for p in params],
            )
        check(after[levels[0]], after[levels[1]])


def _clone(value):
    return value.clone() if isinstance(value, torch.Tensor) else value


def joined_master(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The float32 master that a bfloat16 param and its int16 remainder hold."""
    upper = param.detach().view(torch.int16).to(torch.int32) << 16
    return (upper + remainder.to(torch.int32)).view(torch.float32)


def assert_close_as_loops_round(a: torch.Tensor, b: torch.Tensor, what: str):
    """The two loops differ only in the multiply-adds each level fuses (one rounding instead of
    two; the baseline level fuses none), which moves a float32 result by about an ulp of its
    operands: an ulp of the result, more where it cancels (centered RMSprop's variance, a moment
    near zero). Float32 values agree to the suite's float32 tolerance; 16-bit ones to an ulp of
    their own, rarely two, plus what a float32 cancellation moves (float32's epsilon at the
    tensor's largest magnitude); NaNs and infinities sit in the same places."""
    a, b = a.detach(), b.detach()
    assert torch.equal(a.isnan(), b.isnan()), what
    assert torch.equal(a.isinf(), b.isinf()) and torch.equal(a[a.isinf()], b[b.isinf()]), what
    finite = a.isfinite()
    a, b = a[finite], b[finite]
    if a.dtype in (torch.float16, torch.bfloat16):
        largest = b.float().abs().amax() if b.numel() > 0 else 0.0
        cancellation = torch.finfo(torch.float32).eps * largest
        assert bool(((a.float() - b.float()).abs() <= 2 * ulp(a) + cancellation).all()), what
        # Rarely an ulp apart: a wrong random stream would move half of the stochastic roundings.
        if a.numel() >= 1000:
            assert (a == b).float().mean() > 0.99, what
    else:
        torch.testing.assert_close(a, b, **FP32_CLOSE, msg=what)


def assert_steps_agree(lanes, compilers):
    for a, b, a_state, b_state in zip(lanes[0], compilers[0], lanes[2], compilers[2], strict=True):
        assert_close_as_loops_round(a, b, f"param of {a.numel()} elements")
        assert a_state.keys() == b_state.keys()
        for key, value in a_state.items():
            other = b_state[key]
            if key == "master_remainder":
                value, other = joined_master(a, value), joined_master(b, other)
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
                assert_close_as_loops_round(value, other, f"{key} of {a.numel()}")
            else:
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other)), key


@pytest.mark.parametrize(("name", "options"), OPTIMIZERS)
@pytest.mark.parametrize(("dtype", "precision"), PRECISIONS)
@pytest.mark.parametrize("levels", LEVEL_PAIRS)
def test_lanes_step_as_the_compilers_loop(levels, name, options, dtype, precision):
    step_under_each_isa(levels, name, options, dtype, precision, assert_steps_agree)


def assert_steps_and_unscaled_grads_agree(lanes, compilers):
    assert_steps_agree(lanes, compilers)
    for a, b in zip(lanes[1], compilers[1], strict=True):
        assert torch.equal(a, b), "grads stored back unscaled"


@pytest.mark.parametrize(("dtype", "precision"), PRECISIONS)
@pytest.mark.parametrize("levels", LEVEL_PAIRS)
def test_lanes_unscale_and_clip_as_the_compilers_loop(levels, dtype, precision):
    """GradScaler's unscaling (the grads stored back unscaled) and clipping inside the step."""
    options = dict(lr=1e-3, weight_decay=0.01, max_grad_norm=1.0)
    step_under_each_isa(
        levels,
        "AdamW",
        options,
        dtype,
        precision,
        assert_steps_and_unscaled_grads_agree,
        scaler_scale=256.0,
    )


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.skipif("avx2" not in supported_cpu_isas(), reason="needs AVX2")
def test_lanes_convert_as_the_scalar_code_bit_for_bit(tmp_path):
    """The loads, stores, stochastic rounding and remainder form of the 8 and (on AVX-512) the 16
    lanes against their scalar forms on every upper half of a float's bits (step_lanes_bits.cpp)."""
    torch_lib = Path(torch.__file__).parent / "lib"
    binary = tmp_path / "step_lanes_bits"
    compile_command = [
        "g++", "-O2", "-std=c++20", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-psabi",
        f"-I{REPO / 'csrc'}", *(f"-I{p}" for p in include_paths()),
        str(Path(__file__).with_name("step_lanes_bits.cpp")), "-o", str(binary),
        f"-L{torch_lib}", "-lc10", f"-Wl,-rpath,{torch_lib}",
    ]  # fmt: skip
    built = subprocess.run(compile_command, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0 and "warning" not in built.stderr, built.stderr
    ran = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.strip().endswith(", 0 mismatches"), ran.stdout
    assert "checked the 8 lanes" in ran.stdout, ran.stdout
    if "avx512" in supported_cpu_isas():
        assert "checked the 16 lanes" in ran.stdout, ran.stdout


def test_no_lane_helper_is_left_out_of_line():
    """The lane types' operators and the lane helpers are plain `inline` (csrc/cpu/vec512.h says
    why): one the compiler left out of line would pass 32- or 64-byte vectors through memory at
    every call, a slow path nothing else would show."""
    if shutil.which("nm") is None:
        pytest.skip("needs nm")
    library = _extension.cpu_module().__file__
    symbols = subprocess.run(
        ["nm", "-C", "--defined-only", library], capture_output=True, text=True, check=True
    ).stdout
    left_out = [line for line in symbols.splitlines() if "fastopt::cpu::lanes::" in line]
    assert left_out == [], left_out[:5]
    # And the loops of both forms are there, for every rule: the steps above did run them.
    for form in ("avx512", "avx2"):
        for rule in ("AdamRule", "RmspropRule", "AdagradRule", "AdadeltaRule"):
            loop = f"prefetched_lanes_loop_{form}<fastopt::cpu::StepLoop<fastopt::{rule},"
            assert loop in symbols, loop


# The layouts with bfloat16 state rounded to nearest: the optimizer classes round their bfloat16
# state stochastically, so only the functional ops make these (called without rounding seeds).
# Each op with the range of each of its state lists' starting values (in schema order; None: an
# unused slot, passed as []), chosen as a run would make them (second moments above the squared
# first ones: centered RMSprop's variance is their difference), and its hyperparameters.
SECOND_MOMENT, FIRST_MOMENT = (0.5, 1.5), (-0.1, 0.1)
FUNCTIONAL_STEPS = {
    "adam": (
        (FIRST_MOMENT, SECOND_MOMENT, None),
        dict(
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            decoupled_weight_decay=True,
        ),
    ),
    "rmsprop": (
        (SECOND_MOMENT, FIRST_MOMENT, FIRST_MOMENT),
        dict(lr=1e-2, alpha=0.99, eps=1e-8, momentum=0.9, centered=True),
    ),
    "adagrad": ((SECOND_MOMENT,), dict(lr=1e-2, weight_decay=0.01)),
    "adadelta": ((SECOND_MOMENT, SECOND_MOMENT), dict(lr=1.0, rho=0.9, eps=1e-6)),
}

NEAREST_STATE_LAYOUTS = [
    pytest.param(FP32, None, id="fp32-bf16state"),
    pytest.param(FP16, FP32, id="fp16-master-bf16state"),
    pytest.param(BF16, FP32, id="bf16-master-bf16state"),
    pytest.param(BF16, torch.int16, id="bf16-remainder-bf16state"),
]


def uniform(shape, value_range, gen) -> torch.Tensor:
    low, high = value_range
    return low + (high - low) * torch.rand(shape, generator=gen)


def functional_step_under_each_isa(levels, op, dtype, master_dtype):
    """One functional step from the same params, grads, bfloat16 state and masters under each
    level; returns, per level, the params, every state tensor and the masters (float32, a
    remainder joined with its param)."""
    slot_ranges, hyperparameters = FUNCTIONAL_STEPS[op]
    params = starts(dtype, seed=1, specials=False)
    grads = starts(dtype, seed=2, specials=True)
    gen = generator(3)
    states = [
        [uniform(p.shape, value_range, gen).to(BF16) for p in params] if value_range else []
        for value_range in slot_ranges
    ]
    masters = []
    if master_dtype == FP32:
        masters = [p.float() + 1e-3 * torch.randn(p.shape, generator=gen) for p in params]
    elif master_dtype == torch.int16:
        masters = [
            torch.randint(-(2**15), 2**15, p.shape, generator=gen).to(torch.int16) for p in params
        ]
    after = {}
    for isa in levels:
        level_params, level_states, level_masters = (
            [t.clone() for t in params],
            [[t.clone() for t in slot] for slot in states],
            [t.clone() for t in masters],
        )
        steps = [torch.zeros(()) for _ in params]
        with cpu_isa(isa), two_threads():
            getattr(fastopt.functional, f"{op}_step_")(
                level_params, grads, *level_states, steps, masters=level_masters, **hyperparameters
            )
        if master_dtype == torch.int16:
            level_masters = [
                joined_master(p, r) for p, r in zip(level_params, level_masters, strict=True)
            ]
        after[isa] = level_params + [t for slot in level_states for t in slot] + level_masters
    return after[levels[0]], after[levels[1]]


@pytest.mark.parametrize("op", list(FUNCTIONAL_STEPS))
@pytest.mark.parametrize(("dtype", "master_dtype"), NEAREST_STATE_LAYOUTS)
@pytest.mark.parametrize("levels", LEVEL_PAIRS)
def test_lanes_step_nearest_rounded_state_as_the_compilers_loop(levels, op, dtype, master_dtype):
    lanes, compilers = functional_step_under_each_isa(levels, op, dtype, master_dtype)
    for a, b in zip(lanes, compilers, strict=True):
        assert_close_as_loops_round(a, b, f"{op}: a tensor of {a.numel()} elements")
