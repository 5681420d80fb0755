"""`run_against_torch`: a run of fastopt's optimizer and torch's on the same params and grads,
judged after every step, to rounding in fp32 / fp64 and against torch's own error in bf16 / fp16.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor

from helpers.optim_cases import SHAPES
from helpers.optim_compare import assert_state_format, state_keys, step_and_compare
from helpers.optim_pairs import fp64_twin, make_param_pairs, optimizer_pair, set_grads
from helpers.rng import generator
from helpers.tolerances import TOLERANCES


def run_against_torch(
    name: str,
    dtype: torch.dtype,
    options: dict,
    seed: int,
    steps: int = 10,
    shapes: Sequence[tuple[int, ...]] = SHAPES,
    device: str | torch.device = "cpu",
) -> None:
    """`steps` steps of torch.optim.`name`(foreach=False) and fastopt.Fused`name` on the same
    params and grads in `dtype`, judged after every step: in fp32 / fp64 fastopt must match
    torch to rounding (`_judge_exact`), in bf16 / fp16 be as accurate as torch
    (`_judge_low_precision`).

    `options` holds the optimizer's keyword arguments (lr defaults to 0.01), and in fp32 / fp64
    optionally `tensor_lr`: pass lr as a Tensor.
    """
    ref_params, fast_params = make_param_pairs(shapes, dtype, device=device, seed=seed)
    judge = _judge_exact if dtype in TOLERANCES else _judge_low_precision
    judge(name, dict(options), ref_params, fast_params, generator(seed + 1), steps)


def _judge_exact(name, options, ref_params, fast_params, gen, steps) -> None:
    """Params and every state tensor within TOLERANCES of torch's after every step (in fp32,
    or within twice torch's own rounding noise, measured by an fp64 twin of torch's run).

    `options["tensor_lr"]`: a Tensor lr on the params' device, in their precision (torch
    computes lr / bias_correction in the lr's dtype, so an fp32 lr would round torch's fp64
    step sizes to fp32).
    """
    dtype, device = fast_params[0].dtype, fast_params[0].device
    lr = options.pop("lr", 0.01)
    if options.pop("tensor_lr", False):
        lr = torch.tensor(lr, dtype=dtype, device=device)
    ref, fast = optimizer_pair(name, ref_params, fast_params, lr=lr, **options)
    exact = fp64_twin(name, ref_params, lr=lr, **options) if dtype == torch.float32 else None
    rtol, atol = TOLERANCES[dtype]
    step_and_compare(
        ref, fast, ref_params, fast_params, gen, steps, rtol=rtol, atol=atol, exact=exact
    )
    for p in fast_params:
        assert_state_format(fast, p, state_keys(name, options))


def _max_error(values: Sequence[Tensor], references: Sequence[Tensor]) -> float:
    """The largest absolute error over all elements of all tensors."""
    worst = 0.0
    for value, reference in zip(values, references, strict=True):
        if reference.numel():
            worst = max(worst, (value.double() - reference.double()).abs().max().item())
    return worst


def _low_precision_eps(name: str, dtype: torch.dtype) -> float:
    """torch's default eps; but fp16 cannot hold the defaults of Adam, RMSprop and Adagrad (1e-8,
    1e-10 round to 0, and torch divides 0 by 0 where a tiny grad's square underflows): there
    1e-3 keeps the plain torch fp16 run finite, a fair yardstick."""
    default = inspect.signature(getattr(torch.optim, name)).parameters["eps"].default
    return max(default, 1e-3) if dtype == torch.float16 and default < 1e-6 else default


def _judge_low_precision(name, options, low, fast, gen, steps) -> None:
    """fastopt and torch in the params' precision (bf16 / fp16) are both measured against torch
    in fp32 from the same (upcast) start with the same grads: after every step, fastopt's
    largest error on the params and on every state tensor is at most 2x torch's, plus one ulp
    of the values' magnitude."""
    dtype = fast[0].dtype
    kwargs = {"lr": 1e-2, "eps": _low_precision_eps(name, dtype), **options}
    high = [p.detach().float().requires_grad_() for p in low]
    low_opt, fast_opt = optimizer_pair(name, low, fast, **kwargs)
    high_opt = getattr(torch.optim, name)(high, foreach=False, **kwargs)
    keys = ["param", *state_keys(name, options)]
    for step in range(steps):
        grads = set_grads(gen, low, fast)
        for h, g in zip(high, grads, strict=True):
            h.grad = g.float()  # the same low-precision grads, exactly
        for opt in (low_opt, fast_opt, high_opt):
            opt.step()
        for key in keys:

            def values(opt, params, key=key):
                return list(params) if key == "param" else [opt.state[p][key] for p in params]

            assert_error_within_torchs(
                values(fast_opt, fast),
                values(low_opt, low),
                values(high_opt, high),
                f"step {step} {key}",
            )


def assert_error_within_torchs(
    fast_values: Sequence[Tensor],
    low_values: Sequence[Tensor],
    high_values: Sequence[Tensor],
    where: str,
) -> None:
    """fastopt's largest error against torch's fp32 run (`high_values`) is at most 2x that of
    torch run in the same low precision as fastopt (`low_values`, which must be finite), plus one
    ulp of the values' magnitude."""
    dtype = low_values[0].dtype
    assert all(v.dtype == dtype for v in fast_values), where
    assert all(v.isfinite().all() for v in low_values), f"{where}: torch {dtype} run not finite"
    torch_error = _max_error(low_values, high_values)
    fast_error = _max_error(fast_values, high_values)
    magnitude = max((v.abs().max().item() for v in high_values if v.numel()), default=0)
    assert fast_error <= 2 * torch_error + torch.finfo(dtype).eps * magnitude, (
        f"{where}: fastopt error {fast_error:.3g}, torch {dtype} error {torch_error:.3g}"
    )
