"""FusedAdam / FusedAdamW against torch.optim.Adam / AdamW(foreach=False), step by step.

fp32 and fp64 must match to rounding, every option combined, params and every state tensor
after every step; fp32 under every CPU instruction set. bf16 / fp16 are judged against the error
of a plain torch run in the same precision, both measured against an fp32 reference.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import zlib

import pytest
import torch
from helpers.against_torch import run_against_torch
from helpers.cpu_isa import supported_cpu_isas
from helpers.optim_cases import ADAM_OPTIONS
from helpers.optim_compare import assert_state_format, state_keys
from helpers.optim_pairs import mixed_dtype_starts, set_grads
from helpers.rng import generator
from helpers.tolerances import TOLERANCES

import fastopt
from fastopt import _extension

STEPS = 10


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("options", ADAM_OPTIONS)
def test_fp32_matches_torch_under_every_isa(cpu_isa, name, options):
    run_against_torch(
        name,
        torch.float32,
        options,
        steps=STEPS,
        seed=zlib.crc32(f"{cpu_isa}-{name}".encode()) % 1000,
    )


@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("options", ADAM_OPTIONS)
def test_fp64_matches_torch(name, options):
    run_against_torch(name, torch.float64, options, seed=7, steps=STEPS)


def test_isa_fixture_covers_every_supported_isa():
    module = _extension.cpu_module()
    best = module.best_cpu_isa()
    assert best in ("baseline", "avx2", "avx512")
    assert supported_cpu_isas()[-1] == best
    assert module.active_cpu_isa() in supported_cpu_isas()
    with pytest.raises(ValueError, match="unknown CPU instruction set"):
        module.set_cpu_isa("sse9")
    assert module.active_cpu_isa() in supported_cpu_isas()


_ISA_PROBE = """
import torch, fastopt
p = torch.randn(3, requires_grad=True)
p.grad = torch.randn(3)
try:
    fastopt.FusedAdam([p]).step()
    print("active", fastopt._extension.cpu_module().active_cpu_isa())
except RuntimeError as e:
    print("error", e)
"""


def test_fastopt_cpu_isa_environment_variable():
    """FASTOPT_CPU_ISA caps the choice at startup; an unknown name is an error naming the valid
    ones (run in fresh processes: the choice is made once per process)."""

    def run(value):
        env = dict(os.environ, FASTOPT_CPU_ISA=value)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        out = subprocess.run(
            [sys.executable, "-c", _ISA_PROBE], env=env, cwd=root, capture_output=True,
            text=True, timeout=120, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    assert run("baseline") == "active baseline"
    assert run("sse9") == (
        "error unknown CPU instruction set 'sse9'; expected one of: baseline, avx2, avx512"
    )


@pytest.mark.skipif(
    _extension.cpu_module().best_cpu_isa() == "avx512", reason="this CPU supports every ISA"
)
def test_unsupported_isa_is_refused():
    module = _extension.cpu_module()
    before = module.active_cpu_isa()
    with pytest.raises(ValueError, match="this CPU cannot run avx512"):
        module.set_cpu_isa("avx512")
    assert module.active_cpu_isa() == before


# -- low precision ---------------------------------------------------------------------------

LOW_PRECISION_OPTIONS = [
    pytest.param(dict(amsgrad=a, maximize=m, weight_decay=wd), id=f"ams{int(a)}-max{int(m)}-wd{wd}")
    for a, m, wd in itertools.product([False, True], [False, True], [0.0, 0.1])
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Adam", "AdamW"])
@pytest.mark.parametrize("options", LOW_PRECISION_OPTIONS)
def test_low_precision_error_is_within_torchs(dtype, name, options):
    """fastopt in bf16/fp16 is at most ~2x as far from an fp32 reference as torch in bf16/fp16."""
    run_against_torch(name, dtype, options, seed=21)


def test_mixed_dtypes_in_one_group(device):
    """One group (so one kernel call) holding fp32, fp64, bf16 and fp16 params: each dtype is
    computed as it is alone, with state in the param's dtype."""
    gen = generator(31)
    starts = mixed_dtype_starts(gen, device)
    fast = [s.clone().requires_grad_() for s in starts]
    # The reference: torch in the same dtype for fp32/fp64, fp32 for the low-precision ones.
    ref = [s.clone().requires_grad_() for s in starts[:2]] + [starts[4].clone().requires_grad_()]
    high = [s.float().requires_grad_() for s in starts[2:4]]
    low = [s.clone().requires_grad_() for s in starts[2:4]]
    kwargs = dict(lr=1e-2, eps=1e-3, weight_decay=0.1, amsgrad=True)
    fast_opt = fastopt.FusedAdamW(fast, **kwargs)
    ref_opt = torch.optim.AdamW(ref, foreach=False, **kwargs)
    high_opt = torch.optim.AdamW(high, foreach=False, **kwargs)
    low_opt = torch.optim.AdamW(low, foreach=False, **kwargs)
    for step in range(5):
        grads = set_grads(gen, fast)
        for p, g in zip(ref, [grads[0], grads[1], grads[4]], strict=True):
            p.grad = g.clone()
        for p, q, g in zip(high, low, grads[2:4], strict=True):
            p.grad, q.grad = g.float(), g.clone()
        for opt in (fast_opt, ref_opt, high_opt, low_opt):
            opt.step()
        for f, r in zip([fast[0], fast[1], fast[4]], ref, strict=True):
            rtol, atol = TOLERANCES[r.dtype]
            torch.testing.assert_close(f, r, rtol=rtol, atol=atol, msg=f"step {step}")
        for f, h, lo in zip(fast[2:4], high, low, strict=True):
            fast_error = (f.double() - h.double()).abs().max().item()
            torch_error = (lo.double() - h.double()).abs().max().item()
            slack = torch.finfo(f.dtype).eps * h.abs().max().item()
            assert fast_error <= 2 * torch_error + slack, f"step {step} {f.dtype}"
    for p in fast:
        assert_state_format(fast_opt, p, state_keys("AdamW", dict(amsgrad=True)))
        assert fast_opt.state[p]["step"].item() == 5
