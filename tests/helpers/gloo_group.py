"""Runs checks on every rank of a group of processes joined by gloo on loopback (CPU), for the
distributed tests.

Starting processes costs seconds each time (each imports torch), so a test file starts one group
and runs all of its checks in it, one after the other; its tests then read each check's outcome.
A check is a callable without arguments that raises on failure, picklable (the processes are
spawned: a module-level function, or a functools.partial of one). It runs on every rank at once
and may use collectives.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# A rank that fails leaves the others waiting in a collective; this bounds the wait.
_COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def free_port() -> int:
    """A TCP port of the loopback interface that is free now (no fixed ports: tests may run in
    parallel on one machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_rank_tests(checks: dict[str, Callable[[], None]]) -> tuple[Callable, Callable]:
    """A test file's fixture and test for its `checks`: the module-scoped `outcomes` (one group
    of two ranks runs them all) and `test_on_two_ranks`, one test per check. A file assigns them
    to those names: `outcomes, test_on_two_ranks = two_rank_tests(CHECKS)`."""

    @pytest.fixture(scope="module")
    def outcomes() -> dict[str, str]:
        return run_checks(checks)

    @pytest.mark.parametrize("check", list(checks))
    def test_on_two_ranks(outcomes, check):
        assert outcomes[check] == "", outcomes[check]

    return outcomes, test_on_two_ranks


def run_checks(checks: dict[str, Callable[[], None]], world_size: int = 2) -> dict[str, str]:
    """Runs `checks` in order on each of `world_size` spawned processes joined by gloo, and
    returns each check's outcome by name: "" where it passed on every rank, else why not (the
    traceback of the failing rank, or the failure that stopped the group before the check)."""
    with tempfile.TemporaryDirectory() as log_dir:
        stopped = ""
        try:
            mp.spawn(
                _rank_main,
                args=(world_size, free_port(), checks, log_dir),
                nprocs=world_size,
            )
        except Exception as e:  # a rank raised (its traceback is in its log) or died
            stopped = f"the group stopped: {e}"
        logs = Path(log_dir)
        passed_on = [
            (logs / f"passed.{rank}").read_text().split()
            if (logs / f"passed.{rank}").exists()
            else []
            for rank in range(world_size)
        ]
        errors = {p.name: p.read_text() for p in sorted(logs.glob("error.*"))}
    failed = {name for name in checks if any(f", {name}:\n" in e for e in errors.values())}
    reason = f"{', '.join(sorted(failed))} failed first" if failed else stopped or "no report"
    outcomes = {}
    for name in checks:
        if all(name in passed for passed in passed_on):
            outcomes[name] = ""
        elif name in failed:
            outcomes[name] = "\n".join(e for e in errors.values() if f", {name}:\n" in e)
        else:
            outcomes[name] = f"not run: {reason}"
    return outcomes


def _rank_main(rank: int, world_size: int, port: int, checks, log_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # torch.compile's caches of its own, per rank and per run: torch 2.14 keys a compiled graph of
    # DTensors by their global shapes, so a rank can load another rank's graph, compiled for
    # that rank's shard shapes (uneven shards then fail its size asserts).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(log_dir, f"compile-cache.{rank}"))
    # The processes share the machine's cores: one thread each keeps them from oversubscribing.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=_COLLECTIVE_TIMEOUT)
    try:
        for name, check in checks.items():
            try:
                check()
            except BaseException:
                Path(log_dir, f"error.{rank}").write_text(
                    f"rank {rank}, {name}:\n{traceback.format_exc()}"  # read by run_checks
                )
                raise
            with open(Path(log_dir, f"passed.{rank}"), "a") as log:
                log.write(f"{name}\n")
    finally:
        dist.destroy_process_group()
