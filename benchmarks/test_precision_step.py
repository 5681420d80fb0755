"""pytest-benchmark runs of the precision modes of an AdamW step (fastopt.benchmarking.precision:
master weights, bfloat16 state, clipping) and of torch's fused AdamW, on the CPU.

Run (not part of the default test run): python -m pytest benchmarks/test_precision_step.py
`python -m fastopt bench --features precision` prints the same modes as one table, with the
roofline of each, measured in interleaved rounds.
"""

from __future__ import annotations

import pytest

from fastopt.benchmarking import precision


@pytest.mark.parametrize("mode", precision.MODES, ids=[m.name for m in precision.MODES])
def test_precision_step(benchmark, mode):
    params = precision.make_params(mode.param_dtype, precision.NUMEL, "cpu")
    step = mode.make(params)
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    benchmark.extra_info["bytes_per_param"] = mode.bytes_per_param
    benchmark.extra_info["GB/s"] = round(mode.bytes_per_param * precision.NUMEL / ms / 1e6, 1)
