"""The choice of CPU instruction set: the `cpu_isa` fixture covers every one this CPU supports,
FASTOPT_CPU_ISA caps it at startup, and an instruction set the CPU lacks is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers.cpu_isa import ISA_LEVELS, supported_cpu_isas

from fastopt import _extension


def test_isa_fixture_covers_every_supported_isa():
    module = _extension.cpu_module()
    best = module.best_cpu_isa()
    assert best in ISA_LEVELS
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
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(
            [sys.executable, "-c", _ISA_PROBE], env=env, cwd=root, capture_output=True,
            text=True, timeout=120, check=True,
        )  # fmt: skip
        return out.stdout.strip()

    assert run("baseline") == "active baseline"
    assert run("sse9") == (
        "error unknown CPU instruction set 'sse9'; expected one of: baseline, avx2, avx512, "
        "avx512_vnni, amx"
    )


@pytest.mark.skipif(
    _extension.cpu_module().best_cpu_isa() == "amx", reason="this CPU supports every ISA"
)
def test_unsupported_isa_is_refused():
    module = _extension.cpu_module()
    before = module.active_cpu_isa()
    with pytest.raises(ValueError, match="this CPU cannot run amx"):
        module.set_cpu_isa("amx")
    assert module.active_cpu_isa() == before
