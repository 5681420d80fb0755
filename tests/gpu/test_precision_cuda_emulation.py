"""The CUDA optimizer kernels' precision paths, run under the emulation (no GPU needed): one call
mixing every storage layout (param dtype, master copy, state dtype, stochastic rounding), with
grad scaling and clipping, against the CPU kernels on the same inputs."""

from __future__ import annotations

import pytest
import torch
from helpers import cuda_emulation
from helpers.rng import generator

from fastopt import functional

pytestmark = pytest.mark.skipif(not cuda_emulation.available(), reason="emulation not built")

# (param dtype, master: None / "float32" / "remainder", state dtype), one param each.
LAYOUTS = [
    (torch.float64, None, torch.float64),
    (torch.float32, None, torch.float32),
    (torch.float32, None, torch.bfloat16),
    (torch.float16, None, torch.float16),
    (torch.float16, None, torch.float32),
    (torch.float16, "float32", torch.float32),
    (torch.float16, "float32", torch.bfloat16),
    (torch.bfloat16, None, torch.bfloat16),
    (torch.bfloat16, None, torch.float32),
    (torch.bfloat16, "float32", torch.float32),
    (torch.bfloat16, "float32", torch.bfloat16),
    (torch.bfloat16, "remainder", torch.float32),
    (torch.bfloat16, "remainder", torch.bfloat16),
]
# Sizes that take the vector path and the tail, more than one chunk, and a misaligned start.
SIZES = [4099, 70_001, 7]


def _inputs(seed: int):
    gen = generator(seed)
    params, grads, exp_avgs, exp_avg_sqs, masters = [], [], [], [], []
    for i, (dtype, master, state_dtype) in enumerate(LAYOUTS):
        size = SIZES[i % len(SIZES)]
        start = torch.randn(size, generator=gen)
        params.append(start.to(dtype))
        grads.append((torch.randn(size, generator=gen) * 8).to(dtype))
        exp_avgs.append((torch.randn(size, generator=gen) * 0.1).to(state_dtype))
        exp_avg_sqs.append(torch.rand(size, generator=gen).to(state_dtype))
        if master == "float32":
            masters.append(start.clone())
        elif master == "remainder":
            masters.append(torch.zeros(size, dtype=torch.int16))
        else:
            masters.append(None)
    steps = [torch.tensor(3.0) for _ in LAYOUTS]
    return params, grads, exp_avgs, exp_avg_sqs, steps, masters


def _step(inputs, stochastic: bool) -> None:
    params, grads, exp_avgs, exp_avg_sqs, steps, masters = inputs
    functional.adam_step_(
        params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=1e-2, beta1=0.9, beta2=0.99,
        eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
        grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0), masters=masters,
        grad_norm=torch.tensor(40.0), max_grad_norm=1.0,
        rounding_seeds=[11 * i for i in range(len(LAYOUTS))] if stochastic else [],
    )  # fmt: skip


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_every_layout_in_one_launch_matches_the_cpu_kernel(stochastic):
    on_cpu, emulated = _inputs(0), _inputs(0)
    for _ in range(2):
        _step(on_cpu, stochastic)
        with cuda_emulation.emulated_cuda_kernels():
            _step(emulated, stochastic)
    for name, cpu_list, cuda_list in zip(
        ("params", "grads", "exp_avgs", "exp_avg_sqs", "steps", "masters"),
        on_cpu,
        emulated,
        strict=True,
    ):
        for i, (c, e) in enumerate(zip(cpu_list, cuda_list, strict=True)):
            if c is None:
                continue
            if c.dtype == torch.int16:  # remainders: compare the masters they make
                c = (on_cpu[0][i].view(torch.int16).int() << 16) + c.int()
                e = (emulated[0][i].view(torch.int16).int() << 16) + e.int()
                c, e = c.view(torch.float32), e.view(torch.float32)
            # A last-bit difference before a 16-bit store can round to the next 16-bit value;
            # the next step then carries a difference of that size into the float32 master.
            rounded = LAYOUTS[i][2] in (torch.float16, torch.bfloat16)
            wide = c.dtype in (torch.float32, torch.float64)
            tolerance = dict(rtol=1e-4 if rounded else 1e-6, atol=1e-6) if wide else {}
            torch.testing.assert_close(e, c, **tolerance, msg=f"{name}[{i}]")
            if stochastic and name.startswith("exp_avg") and c.dtype == torch.bfloat16:
                # The random bits are the same on both: the stores agree bit for bit unless the
                # float32 values before them differ in their last bits.
                assert (e == c).double().mean() > 0.99, (name, i)
