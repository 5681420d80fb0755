"""benchmarks/in_cache/run.sh still builds against csrc/ and runs: it includes the element loop's
headers directly, so a change to the loop's interface would otherwise break it unseen."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.cpu_isa import supported_cpu_isas

RUN_SH = Path(__file__).resolve().parents[1] / "benchmarks" / "in_cache" / "run.sh"


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
@pytest.mark.skipif("avx512" not in supported_cpu_isas(), reason="the harness runs avx512 code")
def test_the_in_cache_loop_benchmark_builds_and_times_every_layout():
    result = subprocess.run(
        ["sh", str(RUN_SH), "256"], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr, result.stderr
    # One row per layout: ns/param of the compiler-vectorized loop and the 16-lane loop at AVX-512,
    # then of the compiler-vectorized loop and the 8-lane loop at AVX2.
    number = r" \| ([0-9.]+)"
    rows = re.findall(r"^\| ([^|]+)" + 4 * number + r" \|$", result.stdout, re.MULTILINE)
    assert len(rows) == 7, result.stdout
    assert all(float(t) > 0 for _, *times in rows for t in times), result.stdout
