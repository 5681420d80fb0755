"""Every fastopt optimizer under DistributedDataParallel on 2 gloo processes, each taking half of
every batch, against torch.optim in a single process on the whole batches, in fp64; and
FusedAdagrad with an nn.Embedding(sparse=True), whose sparse grads DDP all-reduces.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.distributed as dist
from helpers.gloo_group import two_rank_tests
from helpers.optim_cases import RICH
from helpers.optim_compare import state_keys
from helpers.optim_pairs import optimizer_pair
from torch import nn
from torch.nn.parallel import DistributedDataParallel

TOLERANCE = dict(rtol=1e-12, atol=1e-12)
DTYPE = torch.float64
BATCH = 8  # each of the 2 ranks takes half


def _compare(name, options, ref_model, ref_opt, model, opt, where: str) -> None:
    keys = state_keys(name, options)
    for i, (r, p) in enumerate(zip(ref_model.parameters(), model.parameters(), strict=True)):
        torch.testing.assert_close(p, r, **TOLERANCE, msg=f"{where}: param {i}")
        assert opt.state[p]["step"].item() == ref_opt.state[r]["step"].item(), (where, i)
        for key in keys:
            torch.testing.assert_close(
                opt.state[p][key], ref_opt.state[r][key], **TOLERANCE, msg=f"{where}: {key} {i}"
            )


def _run(name, options, model, batches, **ddp_options) -> set[torch.layout]:
    """fastopt.Fused`name` on `model` under DDP, each rank on its half of each of `batches`,
    against torch.optim.`name` on a copy of `model` in this process alone, on the whole batches;
    compared after every step. Returns the layouts of the grads that fastopt stepped."""
    layouts = set()
    ref_model = copy.deepcopy(model)
    ddp_model = DistributedDataParallel(model, **ddp_options)
    ref_opt, opt = optimizer_pair(name, ref_model.parameters(), model.parameters(), **options)
    half = slice(dist.get_rank() * BATCH // 2, (dist.get_rank() + 1) * BATCH // 2)
    for step, (x, y) in enumerate(batches):
        nn.functional.mse_loss(ddp_model(x[half]), y[half]).backward()
        layouts |= {p.grad.layout for p in model.parameters()}
        opt.step()
        opt.zero_grad()
        nn.functional.mse_loss(ref_model(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        _compare(name, options, ref_model, ref_opt, model, opt, f"{name}, step {step}")
    return layouts


def ddp_matches_single_process(name: str, **ddp_options) -> None:
    torch.manual_seed(0)  # the same model and batches on every rank
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).to(DTYPE)
    batches = [
        (torch.randn(BATCH, 5, dtype=DTYPE), torch.randn(BATCH, 1, dtype=DTYPE)) for _ in range(3)
    ]
    assert _run(name, RICH[name], model, batches, **ddp_options) == {torch.strided}


def ddp_sparse_embedding_adagrad() -> None:
    """An embedding with sparse grads (rows repeated within a batch, so uncoalesced) beside dense
    layers, in one FusedAdagrad param group."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Embedding(11, 3, sparse=True, dtype=DTYPE), nn.Flatten(), nn.Linear(6, 1, dtype=DTYPE)
    )
    batches = [
        (torch.randint(0, 11, (BATCH, 2)), torch.randn(BATCH, 1, dtype=DTYPE)) for _ in range(3)
    ]
    options = dict(lr=0.1, lr_decay=0.1, initial_accumulator_value=0.2)
    assert _run("Adagrad", options, model, batches) == {torch.strided, torch.sparse_coo}


CHECKS = {
    **{f"ddp-{name}": functools.partial(ddp_matches_single_process, name) for name in RICH},
    "ddp-Adam-grads-as-bucket-views": functools.partial(
        ddp_matches_single_process, "Adam", gradient_as_bucket_view=True
    ),
    "ddp-sparse-embedding-Adagrad": ddp_sparse_embedding_adagrad,
}


outcomes, test_on_two_ranks = two_rank_tests(CHECKS)
