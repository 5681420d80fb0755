"""Reads pytest-benchmark's `--benchmark-json` output of `benchmarks/` into Measurements, so
that `pytest benchmarks` runs draw the same figure as `python -m fastopt bench --plot`."""

from __future__ import annotations

import json
from pathlib import Path

from . import blocksparse_linear, int8_linear, optimizers
from .measurement import Measurement


def read(path: str | Path) -> tuple[list[Measurement], list[str]]:
    """The measurements of every entry of a known benchmark (median time), and the names of the
    entries of benchmarks this reader does not know (left out)."""
    with open(path) as file:
        entries = json.load(file)["benchmarks"]
    measurements, unknown = [], []
    for entry in entries:
        test = entry["name"].split("[", 1)[0]
        params = entry.get("params") or {}
        ms = entry["stats"]["median"] * 1e3
        if test in ("test_optimizer_step", "test_sparse_adagrad_step"):
            measurements.append(optimizers.measurement_from_pytest(test, params, ms))
        elif test == "test_int8_linear":
            measurements.append(int8_linear.measurement_from_pytest(params, ms))
        elif test == "test_blocksparse_linear":
            measurements.append(blocksparse_linear.measurement_from_pytest(params, ms))
        else:
            unknown.append(entry["name"])
    return measurements, unknown
