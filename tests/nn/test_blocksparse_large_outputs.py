"""The block-sparse dsd products on outputs of 4 MiB and more, which the CPU kernels write with
streaming stores (float32) past the caches, against a dense fp64 matmul with the masked weight:
every instruction set, every block size, float32 and bfloat16 (whose outputs take the plain
stores), a row count that leaves a partial panel and a partial vector of rows."""

from __future__ import annotations

import pytest
import torch
from helpers.blocksparse_reference import assert_close_to_reference, make_case, make_mask
from helpers.blocksparse_run import run_with_autograd

FEATURES = 1024  # 4 MiB of float32 output every 1024 rows
ROWS = 1031  # not a multiple of the panels (48 or 24 rows) nor of a vector


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_output_forward_and_grad_input(cpu_isa, block, dtype):
    blocks = FEATURES // block
    mask = make_mask("random", blocks, blocks, torch.Generator().manual_seed(block))
    case = make_case(mask, block, (ROWS,), dtype, seed=block + 1)
    assert case.x.numel() * 4 >= 4 << 20  # the forward output and grad_input are this large
    assert_close_to_reference(run_with_autograd(case), case)
