"""pytest-benchmark runs of gradient clipping by global norm: fastopt.clip_grad_norm_ against
torch.nn.utils.clip_grad_norm_(foreach=True), and the norm alone (torch.ops.fastopt.grad_norm
against torch.nn.utils.get_total_norm(foreach=True)), on fp32 grads after backward().

Run (not part of the default test run):
    python -m pytest benchmarks/test_clip_grad_norm.py --benchmark-group-by=param:case
The contenders of a case run on the same grads, max_norm so large that the coefficient is 1
(the grads keep their values but are still multiplied, as always). `extra_info` records GB/s
(the norm reads 4 bytes per param; clipping reads 8 and writes 4) and the share of the machine's
bandwidth for those bytes, measured in this process: for the norm the read bandwidth of torch's
sum over a buffer larger than any cache, for clipping the traffic probe with 1 updated + 1 read
stream (fastopt.benchmarking). At the end the run prints each case's table with the ratios to
torch.
"""

from __future__ import annotations

import pytest
import torch

import fastopt
from fastopt import benchmarking

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = ["a", "b"]  # 50M params in 300 tensors; 2000 tensors of 4096 params
NO_CLIP = 1e30  # max_norm that keeps the coefficient at 1


def _norm_contenders(grads):
    return {
        "torch get_total_norm": lambda: torch.nn.utils.get_total_norm(grads, foreach=True),
        "fastopt grad_norm": lambda: torch.ops.fastopt.grad_norm(grads, 2.0, None),
    }


def _clip_contenders(params):
    return {
        "torch clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(
            params, NO_CLIP, foreach=True
        ),
        "fastopt clip_grad_norm_": lambda: fastopt.clip_grad_norm_(params, NO_CLIP),
    }


# (what, bytes per param, contenders)
KINDS = {"norm": (4, _norm_contenders), "clip": (12, _clip_contenders)}
_CONTENDERS = [(kind, name) for kind, (_, make) in KINDS.items() for name in make([torch.zeros(1)])]
_RESULTS: dict[tuple[str, str, str], dict[str, float]] = {}


def _bandwidth_ms(kind: str, numel: int, device: str) -> float:
    """The time this machine needs at least to move `kind`'s bytes for `numel` fp32 params: on
    the CPU the traffic probe with clipping's traffic (1 updated + 1 read stream), or torch's sum
    of a buffer larger than any cache (reading only); on CUDA the copy bandwidth."""
    bytes_per_param = KINDS[kind][0]
    if device == "cuda":
        fn, nbytes = benchmarking.copy_roofline(device)
        return benchmarking.median_ms(fn, device) * bytes_per_param * numel / nbytes
    if kind == "clip":
        updated, read = torch.randn(numel), torch.randn(numel)
        return benchmarking.median_ms(
            lambda: torch.ops.fastopt.traffic_probe_([updated], [read]), device
        )
    buffer = torch.randn(max(numel, 64 * 2**20))
    return benchmarking.median_ms(buffer.sum, device) * numel / buffer.numel()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind, contender", _CONTENDERS)
def test_clip_grad_norm(benchmark, device, case, kind, contender):
    case_spec = benchmarking.CASES[case]
    params = benchmarking.make_params(case_spec, device)
    bytes_per_param, make = KINDS[kind]
    fn = make([p.grad for p in params] if kind == "norm" else params)[contender]

    def run():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
    ms = benchmark.stats.stats.median * 1e3
    key = (device, case, kind)
    if key not in _RESULTS:
        _RESULTS[key] = {"bandwidth_ms": _bandwidth_ms(kind, case_spec.numel, device)}
    _RESULTS[key][contender] = ms
    roof = _RESULTS[key]["bandwidth_ms"]
    benchmark.extra_info.update(
        {
            "GB/s": round(bytes_per_param * case_spec.numel / ms / 1e6, 1),
            "share_of_bandwidth": round(roof / ms, 3),
            "bandwidth_ms": round(roof, 3),
        }
    )


@pytest.fixture(scope="module", autouse=True)
def _print_tables(request):
    """After the module: one table per (device, case, kind), ratios within this run."""
    yield
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        _write_tables(plugins.get_plugin("terminalreporter"))


def _write_tables(reporter) -> None:
    for (device, case, kind), times in sorted(_RESULTS.items()):
        roof = times.pop("bandwidth_ms")
        torch_ms = next((ms for name, ms in times.items() if name.startswith("torch")), None)
        numel = benchmarking.CASES[case].numel
        reporter.write_line(
            f"\n{kind}, {benchmarking.CASES[case].description}, on "
            f"{benchmarking.machine_description(device)}; bandwidth bound {roof:.2f} ms"
        )
        reporter.write_line("| contender | ms | GB/s | share of bandwidth | vs torch |")
        reporter.write_line("|---|---|---|---|---|")
        for name, ms in times.items():
            gbs = KINDS[kind][0] * numel / ms / 1e6
            ratio = f"{torch_ms / ms:.2f}x" if torch_ms else "-"
            reporter.write_line(f"| {name} | {ms:.2f} | {gbs:.1f} | {roof / ms:.2f} | {ratio} |")
