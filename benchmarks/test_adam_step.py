"""pytest-benchmark runs of one Adam step: fastopt against torch's fused and foreach Adam.

Run (not part of the default test run):
    python -m pytest benchmarks --benchmark-group-by=param:case
Each case's group holds fastopt and its anchors on the same params, plus the roofline probe;
`extra_info` records GB/s at 28 bytes/param and the share of the roofline; at the end the run
prints each case's table with the speedup over torch fused, all measured in this process.
"""

from __future__ import annotations

import pytest
import torch

from fastopt import benchmarking

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(benchmarking.CASES))
@pytest.mark.parametrize("optimizer", list(benchmarking.OPTIMIZERS))
def test_adam_step(benchmark, measured, device, case, optimizer):
    spec = benchmarking.CASES[case]
    params = benchmarking.make_params(spec, device)
    step = benchmarking.OPTIMIZERS[optimizer](params).step

    def run():
        step()
        _sync(device)

    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    key = (device, case)
    if key not in measured:
        measured[key] = {"roofline_ms": benchmarking.roofline_ms(spec.numel, device)}
    measured[key][optimizer] = ms
    roof = measured[key]["roofline_ms"]
    benchmark.extra_info.update(
        {
            "GB/s": round(benchmarking.BYTES_PER_PARAM * spec.numel / ms / 1e6, 1),
            "share_of_roofline": round(roof / ms, 3),
            "roofline_ms": round(roof, 3),
        }
    )
