"""The optimizer benchmarks: fastopt against torch's fastest paths on the same inputs.

Used by `python -m fastopt bench` and by the pytest-benchmark runs in `benchmarks/`. Every
case runs fastopt and its anchors in one process on the same params, and measures a roofline
for the same bytes on the same machine:
- CPU: `torch.ops.fastopt.traffic_probe_`, a loop with the optimizer's exact fp32 memory traffic
  (Adam: 4 loads and 3 stores per element) and multiply-adds only, run on fastopt's own step
  tensors (params, state, grads: same sizes, same count, same cache state), in both loop forms,
  the faster one kept;
- CUDA: the device's measured copy bandwidth (`Tensor.copy_` of a large buffer).
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastopt

from .measurement import Measurement
from .timing import interleaved_medians, median_ms

Factory = Callable[[list[torch.Tensor]], torch.optim.Optimizer]


@dataclass(frozen=True)
class Family:
    """One optimizer: fastopt's class, torch's anchors, and its fp32 memory traffic."""

    name: str
    updated: int  # tensors per param read and written: the param and its state
    read: int  # tensors per param only read: the grad
    contenders: dict[str, Factory]  # fastopt's first, then torch's

    @property
    def bytes_per_param(self) -> int:
        return 4 * (2 * self.updated + self.read)


FAMILIES = {
    "adam": Family(
        "Adam",
        3,
        1,
        {
            "fastopt.FusedAdam": lambda ps: fastopt.FusedAdam(ps, lr=1e-3),
            "torch Adam(fused=True)": lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True),
            "torch Adam(foreach=True)": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=True),
        },
    ),
    "rmsprop": Family(
        "RMSprop",
        2,
        1,
        {
            "fastopt.FusedRMSprop": lambda ps: fastopt.FusedRMSprop(ps),
            "torch RMSprop(foreach=True)": lambda ps: torch.optim.RMSprop(ps, foreach=True),
            "torch RMSprop(foreach=False)": lambda ps: torch.optim.RMSprop(ps, foreach=False),
        },
    ),
    "adagrad": Family(
        "Adagrad",
        2,
        1,
        {
            "fastopt.FusedAdagrad": lambda ps: fastopt.FusedAdagrad(ps),
            "torch Adagrad(fused=True)": lambda ps: torch.optim.Adagrad(ps, fused=True),
            "torch Adagrad(foreach=True)": lambda ps: torch.optim.Adagrad(ps, foreach=True),
        },
    ),
    "adadelta": Family(
        "Adadelta",
        3,
        1,
        {
            "fastopt.FusedAdadelta": lambda ps: fastopt.FusedAdadelta(ps),
            "torch Adadelta(foreach=True)": lambda ps: torch.optim.Adadelta(ps, foreach=True),
            "torch Adadelta(foreach=False)": lambda ps: torch.optim.Adadelta(ps, foreach=False),
        },
    ),
}


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return sum(self.sizes)


def mixed_sizes(total: int, count: int, seed: int = 0) -> tuple[int, ...]:
    """`count` tensor sizes spread log-uniformly over three decades, summing to `total`."""
    rng = random.Random(seed)
    weights = [math.exp(rng.uniform(0.0, math.log(1000.0))) for _ in range(count)]
    scale = total / sum(weights)
    sizes = [max(1, int(w * scale)) for w in weights]
    sizes[-1] += total - sum(sizes)
    return tuple(sizes)


CASES = {
    "a": Case("a", "50M params in 300 tensors of mixed sizes", mixed_sizes(50_000_000, 300)),
    "b": Case("b", "2000 tensors of 4096 params", (4096,) * 2000),
    "c": Case("c", "one tensor of 10M params", (10_000_000,)),
}


def make_params(case: Case, device: str) -> list[torch.Tensor]:
    """fp32 params with random grads, as a model has them after backward()."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = []
    for size in case.sizes:
        p = torch.nn.Parameter(torch.randn(size, device=device, generator=gen))
        p.grad = torch.randn(size, device=device, generator=gen)
        params.append(p)
    return params


ROOFLINE = "roofline"
# Read before every timed CPU call: more than the last-level caches hold (hundreds of MiB on
# some server CPUs), so every contender, the roofline included, starts from memory, as a step
# does after forward and backward, whatever ran before it in the round. Read, not written: the
# lines it leaves are clean, so the timed call pays no write-back of the eviction's own data.
CACHE_EVICTION_BYTES = 1 << 30
# The traffic probe's loop forms (csrc/optim/cpu/traffic_probe.cpp): the roofline is the faster.
PROBE_FORMS = {"plain loop": False, "prefetched loop": True}


def probes(updated: list[list[torch.Tensor]], read: list[list[torch.Tensor]]) -> dict:
    """{name: fn} of the CPU traffic probe over these streams (each a list of float32 or bfloat16
    tensors, tensor i of one size in every stream), one per loop form: each reads every tensor
    once and writes the updated ones back unchanged. With no updated stream the probe only reads
    (into a sum of its own)."""
    tensors = len(read[0])
    flat_updated = [t for stream in updated for t in stream]
    flat_read = [t for stream in read for t in stream]
    total = None if updated else torch.zeros(1)
    probe = torch.ops.fastopt.traffic_probe_
    return {
        f"{ROOFLINE}, {form}": (
            lambda prefetch=prefetch: probe(flat_updated, flat_read, tensors, prefetch, total)
        )
        for form, prefetch in PROBE_FORMS.items()
    }


def step_streams(
    optimizer: torch.optim.Optimizer, family: Family
) -> tuple[list[list[torch.Tensor]], list[list[torch.Tensor]]]:
    """The streams a step of `optimizer` (which has taken a step, so its state exists) reads and
    writes: (updated: the params and each per-element state, read: the grads)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    states = [
        [
            v
            for v in optimizer.state[p].values()
            if isinstance(v, torch.Tensor) and v.shape == p.shape
        ]
        for p in params
    ]
    if any(len(s) != family.updated - 1 for s in states):
        raise ValueError(f"{family.name}: expected {family.updated - 1} state tensors per param")
    updated = [params] + [list(column) for column in zip(*states, strict=True)]
    return updated, [[p.grad for p in params]]


def copy_roofline(device: str) -> tuple[Callable[[], object], float]:
    """(fn, bytes moved per call) of the roofline on a GPU: a copy of a buffer larger than any
    cache. (On the CPU the roofline is the traffic probe: `probes`, `roofline_ms`.)"""
    src = torch.empty(64 * 2**20, device=device)
    dst = torch.empty_like(src)
    return (lambda: dst.copy_(src)), 2 * src.numel() * src.element_size()


def roofline_ms(family: Family, numel: int, device: str) -> float:
    """The time the roofline takes to move an fp32 step's bytes for `numel` params (on the CPU,
    the faster of the probe's loop forms, on tensors of its own)."""
    if device == "cpu":
        updated = [[torch.randn(numel)] for _ in range(family.updated)]
        read = [[torch.randn(numel)] for _ in range(family.read)]
        return min(interleaved_medians(probes(updated, read), device).values())
    fn, nbytes = copy_roofline(device)
    return median_ms(fn, device) * family.bytes_per_param * numel / nbytes


@dataclass
class Row:
    family: Family
    case: Case
    optimizer: str
    ms: float
    roofline_ms: float
    torch_best_ms: float  # the fastest of torch's contenders in the same run

    @property
    def gb_per_s(self) -> float:
        return self.family.bytes_per_param * self.case.numel / self.ms / 1e6

    @property
    def share_of_roofline(self) -> float:
        return self.roofline_ms / self.ms

    @property
    def speedup_vs_torch_best(self) -> float:
        return self.torch_best_ms / self.ms


def evict_caches(device: str) -> Callable[[], object] | None:
    """On the CPU, a function that reads CACHE_EVICTION_BYTES of memory (written once here, so
    its pages are real memory, not the shared zero page); None elsewhere."""
    if device != "cpu":
        return None
    buffer = torch.ones(CACHE_EVICTION_BYTES // 4)
    return buffer.sum


def run_case(family: Family, case: Case, device: str, repeats: int = 10) -> list[Row]:
    """Times fastopt, torch's anchors and the roofline, interleaved, on the same params; on the
    CPU the roofline runs on fastopt's own step tensors, and the caches are evicted before each
    timed call."""
    params = make_params(case, device)
    optimizers = {name: make(params) for name, make in family.contenders.items()}
    contenders = {name: opt.step for name, opt in optimizers.items()}
    nbytes = family.bytes_per_param * case.numel
    if device == "cpu":
        fastopt_optimizer = next(iter(optimizers.values()))
        fastopt_optimizer.step()  # creates its state
        roof_fns = probes(*step_streams(fastopt_optimizer, family))
        roof_bytes = nbytes
    else:
        roof_fn, roof_bytes = copy_roofline(device)
        roof_fns = {ROOFLINE: roof_fn}
    times = interleaved_medians(
        contenders | roof_fns, device, repeats, before_each=evict_caches(device)
    )
    roof = min(times.pop(name) for name in roof_fns) * nbytes / roof_bytes
    torch_best = min(ms for name, ms in times.items() if name.startswith("torch"))
    return [Row(family, case, name, ms, roof, torch_best) for name, ms in times.items()]


def format_table(rows: list[Row]) -> str:
    header = (
        "| optimizer | case | contender | ms/step | GB/s | vs torch's best | "
        "share of roofline |\n|---|---|---|---:|---:|---:|---:|"
    )
    lines = [header]
    for r in rows:
        lines.append(
            f"| {r.family.name} ({r.family.bytes_per_param} B/param) | {r.case.name}: "
            f"{r.case.description} | {r.optimizer} | {r.ms:.2f} | {r.gb_per_s:.1f} | "
            f"{r.speedup_vs_torch_best:.2f}x | {r.share_of_roofline:.0%} |"
        )
    return "\n".join(lines)


@dataclass
class SparseRow:
    lookups: int  # looked-up rows, duplicates included, as nn.Embedding(sparse=True) gives them
    dim: int
    fastopt_ms: float
    torch_ms: float
    rows_read_ms: float  # the touched rows of the param and its state read (read_touched_rows)

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.fastopt_ms

    @property
    def torch_vs_rows_read(self) -> float:
        """torch's step over a plain read of the rows it touches: about the most a step could gain
        over torch's where reading those rows is the cost (cold rows: page walks, not bytes)."""
        return self.torch_ms / self.rows_read_ms

    @property
    def gb_per_s(self) -> float:
        """Over the bytes of the touched rows: grad read, param and sum read and written."""
        return 5 * 4 * self.lookups * self.dim / self.fastopt_ms / 1e6


def read_touched_rows(param: torch.Tensor, optimizer: torch.optim.Optimizer, rows: torch.Tensor):
    """A reference for what a sparse Adagrad step must do at least: read the touched rows of the
    param and of its state (`optimizer.state[param]["sum"]`, which the optimizer's first step
    makes), here with torch's embedding bag summing each into one row, so that nothing of their
    size is allocated or written. Cold, these reads are scattered, a row per page, and cost what
    the machine's page walks cost as much as their bytes, so the sparse table times them in its
    own rounds. A reference rather than a strict bound: a step with more threads or prefetching
    can read the same rows faster."""
    offsets = torch.zeros(1, dtype=rows.dtype, device=rows.device)
    state_sum = optimizer.state[param]["sum"]
    return [F.embedding_bag(rows, t, offsets, mode="sum") for t in (param.detach(), state_sum)]


def run_sparse_adagrad(
    num_embeddings: int,
    dim: int,
    lookups: list[int],
    device: str,
    repeats: int = 10,
) -> list[SparseRow]:
    """FusedAdagrad against torch.optim.Adagrad (whose sparse path is its single-tensor one) on
    an fp32 embedding with a sparse gradient of `lookups` random rows, duplicates included. On the
    CPU the caches are evicted before each timed call: a step touches the same rows every call
    here, which the call before (the other contender's, on the same embedding) would otherwise
    leave in the last-level cache, where a training step's rows, those of a new batch, are not."""
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(num_embeddings, dim, device=device, generator=gen))
    fast = fastopt.FusedAdagrad([weight])
    reference = torch.optim.Adagrad([weight])
    rows = []
    for n in lookups:
        indices = torch.randint(0, num_embeddings, (1, n), device=device, generator=gen)
        values = torch.randn(n, dim, device=device, generator=gen)
        weight.grad = torch.sparse_coo_tensor(indices, values, weight.shape)
        contenders = {
            "fastopt": fast.step,  # first: its warm-up calls make the state that "rows read" reads
            "torch": reference.step,
            "rows read": functools.partial(read_touched_rows, weight, fast, indices[0]),
        }
        times = interleaved_medians(contenders, device, repeats, before_each=evict_caches(device))
        rows.append(SparseRow(n, dim, times["fastopt"], times["torch"], times["rows read"]))
    return rows


SPARSE_FASTOPT, SPARSE_TORCH = "fastopt.FusedAdagrad", "torch Adagrad"


def format_sparse_table(rows: list[SparseRow], num_embeddings: int) -> str:
    lines = [
        "| embedding | looked-up rows | fastopt.FusedAdagrad ms | torch Adagrad ms | speedup | "
        "GB/s of touched rows | rows read (embedding bag) ms | torch / rows read |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {num_embeddings} x {r.dim} | {r.lookups} | {r.fastopt_ms:.3f} | "
            f"{r.torch_ms:.3f} | {r.speedup:.1f}x | {r.gb_per_s:.1f} | {r.rows_read_ms:.3f} | "
            f"{r.torch_vs_rows_read:.1f}x |"
        )
    return "\n".join(lines)


FEATURE = "optimizer step"
SPARSE_FEATURE = "Adagrad, sparse gradient"


def _group(device: str, family_name: str, case: Case) -> str:
    return f"{device}, {family_name}, {case.name}: {case.description}"


def measurements(
    device: str, rows: Sequence[Row], sparse_rows: Sequence[SparseRow] = ()
) -> list[Measurement]:
    """The figure's view of the tables measured on `device`: one group per optimizer and case
    (torch's paths are the anchors), and one per sparse-gradient size."""
    dense = [
        Measurement(
            FEATURE,
            _group(device, r.family.name, r.case),
            r.optimizer,
            r.ms,
            _is_torch(r.optimizer),
        )
        for r in rows
    ]
    sparse = [
        Measurement(SPARSE_FEATURE, f"{device}, {r.lookups} rows", name, ms, name == SPARSE_TORCH)
        for r in sparse_rows
        for name, ms in ((SPARSE_FASTOPT, r.fastopt_ms), (SPARSE_TORCH, r.torch_ms))
    ]
    return dense + sparse


def _is_torch(contender: str) -> bool:
    return contender.startswith("torch")


def measurement_from_pytest(test: str, params: dict, ms: float) -> Measurement:
    """The Measurement of one `benchmarks/test_optimizer_step.py` entry of a --benchmark-json
    file (`test` is the test function's name)."""
    if test == "test_sparse_adagrad_step":
        name = params["optimizer"]
        group = f"{params['device']}, {params['lookups']} rows"
        return Measurement(SPARSE_FEATURE, group, name, ms, name == SPARSE_TORCH)
    family = FAMILIES[params["family"]]
    group = _group(params["device"], family.name, CASES[params["case"]])
    name = params["contender"]
    return Measurement(FEATURE, group, name, ms, _is_torch(name))
