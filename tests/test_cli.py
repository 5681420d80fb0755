"""`python -m fastopt --help` and `bench` / `plot` end to end at the benchmarks' test-only "tiny"
size (`bench --tiny`, hidden from --help: seconds, meaningless numbers)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fastopt.__main__ import main
from fastopt.benchmarking import blocksparse_linear, int8_linear, optimizers, pytest_json
from fastopt.benchmarking.measurement import Measurement, speedups

SUBCOMMANDS = ["info", "selftest", "bench", "plot", "demo"]


def test_help_lists_every_subcommand_with_one_line():
    printed = subprocess.run(
        [sys.executable, "-m", "fastopt", "--help"], capture_output=True, text=True, check=True
    ).stdout
    listed = {line.split()[0]: line for line in printed.splitlines() if line.startswith("    ")}
    for command in SUBCOMMANDS:
        assert command in listed and len(listed[command].split()) > 2, printed


def test_bench_prints_every_feature_table_with_the_machine_and_plots(tmp_path, capsys):
    figure = tmp_path / "bench.png"
    assert main(["bench", "--tiny", "--device", "cpu", "--plot", str(figure)]) == 0
    printed = capsys.readouterr().out
    titles = ("Optimizer steps, fp32, on ", "AdamW step by precision mode", "Int8Linear 64x64 on ",
              "BlockSparseLinear 64x64")  # fmt: skip
    for title in titles:
        assert title in printed
    assert printed.count("threads, ") >= 4  # each table names the machine
    for contender in ("fastopt.FusedAdam", "fastopt bf16 + remainder + bf16 state",
                      "torch.ao dynamic int8", "torch BSR"):  # fmt: skip
        assert contender in printed
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_refuses_an_unknown_feature():
    with pytest.raises(SystemExit, match="unknown --features"):
        main(["bench", "--tiny", "--features", "int4"])


def test_speedups_divide_the_fastest_anchor_of_each_group():
    runs = [
        Measurement("f", "g", "fastopt", 2.0, anchor=False),
        Measurement("f", "g", "torch slow", 8.0, anchor=True),
        Measurement("f", "g", "torch fast", 4.0, anchor=True),
        Measurement("f", "no anchor", "fastopt", 1.0, anchor=False),
    ]
    assert speedups(runs) == {runs[0]: 2.0, runs[1]: 0.5, runs[2]: 1.0}


def _entry(name: str, params: dict, median_s: float) -> dict:
    # The fields of a pytest-benchmark --benchmark-json entry that the reader uses.
    return {"name": name, "params": params, "stats": {"median": median_s}}


def test_pytest_benchmark_json_becomes_the_same_figure(tmp_path, capsys):
    """Every benchmark file's entries map to the Measurements `bench` makes for the same case."""
    case = optimizers.CASES["c"]
    bs_case = [16, 0.25, 32]  # JSON stores the tuple as a list
    entries = [
        _entry(
            "test_optimizer_step[adam-fastopt.FusedAdam-c-cpu]",
            {"family": "adam", "contender": "fastopt.FusedAdam", "case": "c", "device": "cpu"},
            0.007,
        ),
        _entry(
            "test_optimizer_step[adam-torch Adam(fused=True)-c-cpu]",
            {"family": "adam", "contender": "torch Adam(fused=True)", "case": "c", "device": "cpu"},
            0.008,
        ),
        _entry(
            "test_int8_linear[fastopt Int8Linear-1-cpu]",
            {"layer": int8_linear.FASTOPT, "batch": 1, "device": "cpu"},
            0.0004,
        ),
        _entry(
            "test_int8_linear[fp32 nn.Linear-1-cpu]",
            {"layer": int8_linear.FP32, "batch": 1, "device": "cpu"},
            0.002,
        ),
        _entry(
            "test_blocksparse_linear[batch16-d0.25-B32-fastopt-forward]",
            {"case": bs_case, "impl": blocksparse_linear.FASTOPT, "pass_": "forward"},
            0.001,
        ),
        _entry(
            "test_blocksparse_linear[batch16-d0.25-B32-dense F.linear-forward]",
            {"case": bs_case, "impl": blocksparse_linear.DENSE, "pass_": "forward"},
            0.007,
        ),
        _entry("test_something_new[x]", {"x": 1}, 0.001),
    ]
    path = tmp_path / "results.json"
    path.write_text(
        json.dumps({"machine_info": {"cpu": {"brand_raw": "a CPU"}}, "benchmarks": entries})
    )
    measured, unknown = pytest_json.read(path)
    assert unknown == ["test_something_new[x]"]
    rows = [
        optimizers.Row(optimizers.FAMILIES["adam"], case, n, ms, 1.0, 8.0)
        for n, ms in (("fastopt.FusedAdam", 7.0), ("torch Adam(fused=True)", 8.0))
    ]
    int8 = {("cpu", 1): {int8_linear.FASTOPT: (0.4, 0.0), int8_linear.FP32: (2.0, 0.0)}}
    bs = {
        tuple(bs_case): {
            (blocksparse_linear.FASTOPT, "forward"): 1.0,
            (blocksparse_linear.DENSE, "forward"): 7.0,
        }
    }
    expected = (
        optimizers.measurements("cpu", rows)
        + int8_linear.measurements(int8)
        + blocksparse_linear.measurements(bs)
    )

    def key(m: Measurement) -> tuple:
        return (m.feature, m.group, m.contender, round(m.ms, 9), m.anchor)

    assert sorted(map(key, measured)) == sorted(map(key, expected))
    figure = tmp_path / "from-json.png"
    assert main(["plot", str(path), "-o", str(figure)]) == 0
    assert "left out 1 entries" in capsys.readouterr().out
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib_says_what_to_install_before_measuring(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now fails
    assert main(["bench", "--tiny", "--plot", "never.png"]) == 1
    captured = capsys.readouterr()
    assert "python -m fastopt bench --plot needs matplotlib" in captured.err
    assert "pip install matplotlib" in captured.err
    assert captured.out == ""  # nothing was measured
