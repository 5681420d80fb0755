"""Every configuration fastopt's Triton launchers can choose (``fastopt.triton.configs``), compiled
for sm_80 and sm_90 without a GPU: it lowers, fits the SM's shared memory, and ptxas spills no
registers. This catches the out-of-resources and lowering failures the interpreter never sees.

The launches are recorded from the launchers themselves and compiled in one subprocess (Triton
compiles nothing under TRITON_INTERPRET=1), once per test run: see triton_compile.py. The default
run compiles every int8 configuration and the block-sparse ones of the two largest block sizes
(the most shared memory and registers); FASTOPT_COMPILE_ALL=1 compiles every block size too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fastopt.triton import blocksparse, configs, int8_linear

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
COMPILE_ALL = os.environ.get("FASTOPT_COMPILE_ALL") == "1"
SHARED_MEMORY = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}  # per block, the CUDA guide's


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    tests = os.path.join(ROOT, "tests")  # for helpers/, as pytest's pythonpath gives the tests
    env["PYTHONPATH"] = os.pathsep.join([ROOT, tests, env.get("PYTHONPATH", "")])
    command = [sys.executable, "triton_compile.py", "--jobs", "2"]
    done = subprocess.run(
        command + (["--all"] if COMPILE_ALL else []),
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-5000:]
    results = json.loads(done.stdout)
    assert {r["target"] for r in results} == set(SHARED_MEMORY)
    return results


def _name(r: dict) -> str:
    return f"{r['kernel']} {r['label']} {r['config']} on {r['target']}"


def test_every_configuration_lowers(compiled):
    failed = [f"{_name(r)}: {r['error']}" for r in compiled if "error" in r]
    assert not failed, "\n".join(failed)


def test_every_configuration_fits_shared_memory(compiled):
    too_big = [
        f"{_name(r)}: {r['shared']} bytes"
        for r in compiled
        if "error" not in r and r["shared"] > SHARED_MEMORY[r["target"]]
    ]
    assert not too_big, "\n".join(too_big)


def test_no_configuration_spills_registers(compiled):
    """ptxas's report: no spill stores or loads (a spill moves registers to local memory, a
    many-fold slowdown of the inner loop)."""
    spilled = [
        f"{_name(r)}: {r['regs']} registers, {r['spill_stores']} bytes spilled\n{r['ptxas']}"
        for r in compiled
        if "error" not in r and (r["spill_stores"] is None or r["spill_stores"] or r["spill_loads"])
    ]
    assert not spilled, "\n".join(spilled)


def test_every_kernel_and_variant_is_compiled(compiled):
    """The default run compiles each kernel, each op's specialization and each dot kind, and
    all the configurations of the int8 kernels, for both targets."""
    seen = {
        (r["kernel"], r["label"].split(" B=")[0].split(" rows=")[0], r["target"]) for r in compiled
    }
    for target in SHARED_MEMORY:
        for kind in configs.DOT_KINDS:
            dtypes = ("float16", "bfloat16") if kind == "16-bit" else ("float32",)
            for dtype in dtypes:
                assert ("_dsd_kernel", f"forward {dtype} {kind}", target) in seen
                assert ("_dsd_kernel", f"grad_input {dtype} {kind}", target) in seen
                assert ("_sdd_kernel", f"grad_values {dtype} {kind}", target) in seen
    int8_configs = {
        (r["target"], r["kernel"], json.dumps(r["config"], sort_keys=True)) for r in compiled
    }
    for target in SHARED_MEMORY:
        for _, config in configs.INT8_GEMM_TILES:
            options = json.dumps(config.launch_options(), sort_keys=True)
            assert (target, "_int8_gemm_kernel", options) in int8_configs
        for table in configs.WEIGHT_ONLY_TILES.values():
            for _, config in table:
                options = json.dumps(config.launch_options(), sort_keys=True)
                assert (target, "_weight_only_kernel", options) in int8_configs
        for kernel in ("_int8_gemm_kernel", "_weight_only_kernel"):  # the GELU epilogue
            assert any(
                (r["target"], r["kernel"]) == (target, kernel) and " gelu " in r["label"]
                for r in compiled
            )


# --- the launchers' choice of configuration ---

ROW_COUNTS = [1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1000, 4097, 10**6, 10**10]


@pytest.mark.parametrize("kind", configs.DOT_KINDS)
@pytest.mark.parametrize("block", configs.BLOCKSPARSE_BLOCKS)
def test_blocksparse_tiles_hold_the_rows_without_waste(kind, block):
    """A row tile of 16 at least (tl.dot's minimum), the smallest that holds the rows up to the
    block and dot kind's largest, which takes any more rows; likewise grad_values' row steps."""
    dsd = {rows: dict(configs.dsd(block, kind, rows).blocks)["BLOCK_M"] for rows in ROW_COUNTS}
    largest = max(dsd.values())
    for rows, tile in dsd.items():
        assert tile in configs.DSD_ROW_TILES and tile >= 16
        assert tile >= rows or tile == largest
        smaller = [t for t in configs.DSD_ROW_TILES if t < tile]
        assert not smaller or max(smaller) < rows
    sdd = {rows: dict(configs.sdd(block, kind, rows).blocks)["BLOCK_K"] for rows in ROW_COUNTS}
    for rows, step in sdd.items():
        assert step in configs.SDD_ROW_STEPS and (step >= rows or step == max(sdd.values()))


def test_int8_tiles_by_rows():
    """Decode-like batches (16 rows at most) take the 16-row tile, up to 64 rows the 64-row one,
    more rows the 128 x 128 one; the row quantization takes 1024 features per step past 128."""
    names = {1: 16, 16: 16, 17: 64, 64: 64, 65: 128, 10**9: 128}
    for rows, tile in names.items():
        assert dict(configs.int8_gemm(rows).blocks)["BLOCK_M"] == tile
        assert dict(configs.weight_only(torch.float16, rows).blocks)["BLOCK_M"] == tile
    assert dict(configs.int8_gemm(65).blocks)["BLOCK_N"] == 128
    for features, step in {1: 128, 128: 128, 129: 1024, 1025: 1024, 10**6: 1024}.items():
        assert dict(configs.quantize_rows(features).blocks)["BLOCK_K"] == step


class _Recorder:
    """Stands for a kernel: records the keyword arguments of its launches, runs nothing."""

    def __init__(self, launches):
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(kwargs)


@pytest.mark.parametrize("kind", configs.DOT_KINDS)
@pytest.mark.parametrize("rows", [5, 40, 200])
def test_blocksparse_launchers_launch_the_chosen_configuration(monkeypatch, kind, rows):
    dtype = torch.float16 if kind == "16-bit" else torch.float32
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", kind == "tf32")
    assert configs.dot_kind(dtype) == kind
    launches: list[dict] = []
    monkeypatch.setattr(blocksparse, "_dsd_kernel", _Recorder(launches))
    monkeypatch.setattr(blocksparse, "_sdd_kernel", _Recorder(launches))
    block = 128
    zero = torch.zeros(1, dtype=torch.long)
    index = (torch.tensor([0, 1]), zero, zero, torch.tensor([0, 1]), zero, zero)
    values = torch.randn(1, block, block).to(dtype)
    x = torch.randn(rows, block).to(dtype)
    blocksparse.blocksparse_linear(x, values, None, *index)
    blocksparse.blocksparse_linear_grad_input(x, values, *index[3:])
    blocksparse.blocksparse_linear_grad_values(x, x, zero, zero, block)
    expected = [configs.dsd(block, kind, rows)] * 2 + [configs.sdd(block, kind, rows)]
    precision = "ieee" if kind == "ieee" else "tf32"
    for kwargs, config in zip(launches, expected, strict=True):
        assert kwargs["PRECISION"] == precision
        assert {k: kwargs[k] for k in config.launch_options()} == config.launch_options()


@pytest.mark.parametrize("dtype", configs.INT8_DTYPES)
@pytest.mark.parametrize("rows", [3, 40, 200])
def test_int8_launchers_launch_the_chosen_configuration(monkeypatch, dtype, rows):
    launches: list[dict] = []
    for name in ("_int8_gemm_kernel", "_weight_only_kernel", "_quantize_rows_kernel"):
        monkeypatch.setattr(int8_linear, name, _Recorder(launches))
    k, n = 1500, 48
    packed = torch.zeros(3, triton_cdiv(k, 4), 16, 4, dtype=torch.int8)
    compensation = torch.zeros(n, dtype=torch.int32)
    x = torch.randn(rows, k).to(dtype)
    scale = torch.rand(n)
    int8_linear.int8_linear(x, packed, compensation, k, scale, None, None, True)
    int8_linear.int8_linear(x, packed, compensation, k, scale, None, None, False)
    expected = [
        configs.quantize_rows(k),
        configs.int8_gemm(rows),
        configs.weight_only(dtype, rows),
    ]
    for kwargs, config in zip(launches, expected, strict=True):
        assert {k: kwargs[k] for k in config.launch_options()} == config.launch_options()


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
