"""Forward and backward of fastopt's block-sparse op on one `blocksparse_reference.Case`."""

from __future__ import annotations

import torch

import fastopt.functional.blocksparse as bs
from helpers.blocksparse_reference import Case


def run_with_autograd(case: Case, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Forward and backward through fastopt.functional.blocksparse_linear on `device`: the output
    and the gradients of input, values and bias, on the CPU."""
    leaves = {"input": case.x, "values": case.values}
    if case.bias is not None:
        leaves["bias"] = case.bias
    leaves = {k: v.to(device).requires_grad_() for k, v in leaves.items()}
    index = bs.index_from_mask(case.mask.to(device))
    out = bs.blocksparse_linear(leaves["input"], leaves["values"], index, leaves.get("bias"))
    out.backward(case.grad_out.to(device))
    results = {"out": out.detach()} | {k: v.grad for k, v in leaves.items()}
    return {k: v.cpu() for k, v in results.items()}
