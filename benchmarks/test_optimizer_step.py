"""pytest-benchmark runs of one optimizer step: fastopt against torch's fastest paths.

Run (not part of the default test run):
    python -m pytest benchmarks --benchmark-group-by=param:family,param:case
Each (optimizer, case) group holds fastopt and its torch anchors on the same params; the
roofline probe with that optimizer's traffic is measured once per group; `extra_info` records
GB/s and the share of the roofline; at the end the run prints each group's table with the
speedup over torch's fastest contender, all measured in this process. The sparse Adagrad runs
time FusedAdagrad and torch.optim.Adagrad on a 1M x 128 embedding's sparse gradient.
"""

from __future__ import annotations

import pytest
import torch

import fastopt
from fastopt import benchmarking

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

_CONTENDERS = [
    (family, contender)
    for family, spec in benchmarking.FAMILIES.items()
    for contender in spec.contenders
]


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(benchmarking.CASES))
@pytest.mark.parametrize("family, contender", _CONTENDERS)
def test_optimizer_step(benchmark, measured, device, case, family, contender):
    spec = benchmarking.FAMILIES[family]
    case_spec = benchmarking.CASES[case]
    params = benchmarking.make_params(case_spec, device)
    step = spec.contenders[contender](params).step

    def run():
        step()
        _sync(device)

    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    key = (device, family, case)
    if key not in measured:
        measured[key] = {"roofline_ms": benchmarking.roofline_ms(spec, case_spec.numel, device)}
    measured[key][contender] = ms
    roof = measured[key]["roofline_ms"]
    benchmark.extra_info.update(
        {
            "GB/s": round(spec.bytes_per_param * case_spec.numel / ms / 1e6, 1),
            "share_of_roofline": round(roof / ms, 3),
            "roofline_ms": round(roof, 3),
        }
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lookups", [1024, 4096, 16384])
@pytest.mark.parametrize("optimizer", ["fastopt.FusedAdagrad", "torch Adagrad"])
def test_sparse_adagrad_step(benchmark, device, lookups, optimizer):
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(1_000_000, 128, device=device, generator=gen))
    indices = torch.randint(0, weight.shape[0], (1, lookups), device=device, generator=gen)
    values = torch.randn(lookups, 128, device=device, generator=gen)
    weight.grad = torch.sparse_coo_tensor(indices, values, weight.shape)
    make = fastopt.FusedAdagrad if optimizer.startswith("fastopt") else torch.optim.Adagrad
    step = make([weight]).step

    def run():
        step()
        _sync(device)

    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
