"""How fastopt's Triton launchers launch: under the device guard of the tensors' device (Triton
launches on the current device and its current stream), and on grids within CUDA's limits for any
number of rows. The launchers run on CPU tensors in Triton's interpreter (conftest sets
TRITON_INTERPRET=1 where there is no GPU); the grids are computed for huge shapes without
launching anything."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers.rng import generator

from fastopt.triton import blocksparse, configs, int8_linear, launch

MAX_GRID = (2**31 - 1, 65535, 65535)  # CUDA's, written out here rather than read from fastopt


def _launchers_on(device: str) -> list[tuple[object, callable]]:
    """(module, a call of one of its launchers) for every launcher, on small tensors."""
    gen = generator(int(torch.randint(0, 2**31, ())))
    x = torch.randn(3, 32, generator=gen).to(device)
    values = torch.randn(2, 16, 16, generator=gen).to(device)
    index = [
        torch.tensor(t, device=device)
        for t in ([0, 1, 2], [0, 1], [0, 1], [0, 1, 2], [0, 1], [0, 1])
    ]  # a 32 -> 32 layer holding the two diagonal blocks
    packed = torch.randint(-127, 128, (2, 8, 16, 4), generator=gen, dtype=torch.int8).to(device)
    compensation = torch.zeros(32, dtype=torch.int32, device=device)
    scale = torch.rand(32, generator=gen).to(device)
    return [
        (blocksparse, lambda: blocksparse.blocksparse_linear(x, values, None, *index)),
        (
            blocksparse,
            lambda: blocksparse.blocksparse_linear_grad_input(x, values, *index[3:]),
        ),
        (
            blocksparse,
            lambda: blocksparse.blocksparse_linear_grad_values(x, x, index[2], index[1], 16),
        ),
        (int8_linear, lambda: int8_linear.int8_mm(x.to(torch.int8), packed, compensation, 32)),
        (
            int8_linear,
            lambda: int8_linear.int8_linear(x, packed, compensation, 32, scale, None, None, True),
        ),
        (
            int8_linear,
            lambda: int8_linear.int8_linear(x, packed, compensation, 32, scale, None, None, False),
        ),
    ]


_KERNELS = {
    blocksparse: ("_dsd_kernel", "_sdd_kernel"),
    int8_linear: ("_quantize_rows_kernel", "_int8_gemm_kernel", "_weight_only_kernel"),
}


@pytest.mark.parametrize("which", range(6))
def test_every_launch_runs_under_the_guard_of_the_input_device(monkeypatch, which):
    """Each kernel launch happens while the launcher holds `device_guard(input.device)`, and the
    grid it launches is the launcher's grid function's."""
    module, call = _launchers_on("cpu")[which]
    held: list[torch.device] = []
    launched: list[torch.device | None] = []

    @contextlib.contextmanager
    def spy_guard(device):
        held.append(device)
        try:
            yield
        finally:
            held.pop()

    class SpyKernel:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append(held[-1] if held else None)
                return self.kernel[grid](*args, **kwargs)

            return run

    monkeypatch.setattr(module, "device_guard", spy_guard)
    for name in _KERNELS[module]:
        monkeypatch.setattr(module, name, SpyKernel(getattr(module, name)))
    call()
    assert launched and all(d == torch.device("cpu") for d in launched), launched


def test_device_guard_makes_the_tensors_device_current(monkeypatch):
    """A CUDA device is entered with torch.cuda.device (which also makes that device's current
    stream the one Triton launches on); a CPU tensor needs no guard."""
    entered = []

    class SpyDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", SpyDevice)
    with launch.device_guard(torch.device("cuda", 1)):
        assert entered == [torch.device("cuda", 1)]
    with launch.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_launchers_run_on_the_tensors_device_not_the_current_one():
    """Tensors on cuda:1 while cuda:0 is current give the results of the same launches on cuda:0
    (Triton would otherwise launch on cuda:0, reading cuda:1's memory), also on a side stream of
    cuda:1."""
    torch.cuda.set_device(0)
    torch.manual_seed(0)  # _launchers_on draws a seed: the same inputs on both devices
    expected = [call().cpu() for _, call in _launchers_on("cuda:0")]
    side = torch.cuda.Stream(device=1)
    for stream in (None, side):
        torch.manual_seed(0)
        calls = _launchers_on("cuda:1")
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            results = [call() for _, call in calls]
        torch.cuda.synchronize(1)
        assert torch.cuda.current_device() == 0
        for got, want in zip(results, expected, strict=True):
            assert got.device == torch.device("cuda", 1)
            assert torch.equal(got.cpu(), want)


def _assert_launchable(grid):
    assert len(grid) <= 3, grid
    assert all(1 <= g <= MAX_GRID[axis] for axis, g in enumerate(grid)), grid


@pytest.mark.parametrize("rows", [1, 4_194_305, 65535 * 64 + 1, 10**10])
def test_grids_put_rows_on_axis_0(rows):
    """Any number of rows launches: past 65535 * 64 (about 4.19M) rows, the row tiles would
    not fit on grid axis 1."""
    for block in configs.BLOCKSPARSE_BLOCKS:
        config = configs.dsd(block, "16-bit", rows)
        grid = blocksparse.dsd_grid("blocksparse_linear", rows, 4096 // block, config)
        assert grid[0] == -(-rows // dict(config.blocks)["BLOCK_M"])
        _assert_launchable(grid)
    config = configs.int8_gemm(rows)
    grid = int8_linear.gemm_grid("int8_linear", rows, 16384, config)
    assert grid[0] == -(-rows // dict(config.blocks)["BLOCK_M"])
    _assert_launchable(grid)
    _assert_launchable(int8_linear.quantize_grid("int8_linear", min(rows, MAX_GRID[0])))
    _assert_launchable(blocksparse.sdd_grid("blocksparse_linear_grad_values", rows // 1000 + 1))


def test_grids_past_cuda_limits_are_clear_errors():
    """What no grid can launch is refused with the op's name, before any launch."""
    config = configs.dsd(16, "tf32", 100)
    with pytest.raises(RuntimeError, match=r"fastopt.blocksparse_linear: 65536 output block"):
        blocksparse.dsd_grid("blocksparse_linear", 100, 65536, config)
    with pytest.raises(RuntimeError, match=r"fastopt.blocksparse_linear_grad_values: 2147483648"):
        blocksparse.sdd_grid("blocksparse_linear_grad_values", 2**31)
    config = configs.int8_gemm(100)
    n = 65536 * dict(config.blocks)["BLOCK_N"]
    with pytest.raises(RuntimeError, match=r"fastopt.int8_linear: 65536 output feature tiles"):
        int8_linear.gemm_grid("int8_linear", 100, n, config)
    with pytest.raises(RuntimeError, match=r"fastopt.int8_linear: 2147483648 rows exceed"):
        int8_linear.quantize_grid("int8_linear", 2**31)
