"""One timed contender of one benchmark case: what every feature's benchmark hands to the
figure, whether measured by `python -m fastopt bench` or read from pytest-benchmark's JSON."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measurement:
    """The median time of `contender` in `group` (a case: every contender of a group ran on the
    same inputs in one process). Anchors are the references fastopt is measured against (torch's
    paths); speedups divide the fastest anchor of the group by the contender's time."""

    feature: str
    group: str
    contender: str
    ms: float
    anchor: bool


def speedups(measurements: list[Measurement]) -> dict[Measurement, float]:
    """Each measurement's speedup over the fastest anchor of its (feature, group); groups without
    an anchor are left out."""
    best: dict[tuple[str, str], float] = {}
    for m in measurements:
        if m.anchor:
            key = (m.feature, m.group)
            best[key] = min(best.get(key, m.ms), m.ms)
    return {
        m: best[(m.feature, m.group)] / m.ms for m in measurements if (m.feature, m.group) in best
    }
