"""The sparse Adagrad benchmark's table (`python -m fastopt bench --features optimizers`): its
rows-read reference reads exactly the touched rows, and a tiny run fills every column."""

from __future__ import annotations

import torch

import fastopt
from fastopt.benchmarking import optimizers


def test_rows_read_reads_the_touched_rows_of_param_and_state():
    param = torch.nn.Parameter(torch.randn(50, 8))
    opt = fastopt.FusedAdagrad([param], initial_accumulator_value=0.5)
    rows = torch.tensor([3, 17, 3, 49])
    param.grad = torch.sparse_coo_tensor(rows[None], torch.randn(4, 8), param.shape)
    opt.step()
    param_rows, sum_rows = optimizers.read_touched_rows(param, opt, rows)
    torch.testing.assert_close(param_rows[0], param.detach()[rows].sum(0))
    torch.testing.assert_close(sum_rows[0], opt.state[param]["sum"][rows].sum(0))


def test_a_tiny_run_fills_every_column():
    rows = optimizers.run_sparse_adagrad(1000, 8, [16, 64], "cpu", repeats=1)
    assert [r.lookups for r in rows] == [16, 64]
    for r in rows:
        assert r.fastopt_ms > 0 and r.torch_ms > 0 and r.rows_read_ms > 0
        assert r.torch_vs_rows_read == r.torch_ms / r.rows_read_ms
    lines = optimizers.format_sparse_table(rows, 1000).splitlines()
    assert len(lines) == 4
    assert all(line.count("|") == 9 for line in lines)
