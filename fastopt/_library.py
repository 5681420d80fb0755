"""Every fastopt op: its schema and its fake (meta) implementation, defined once.

Kernels are registered per device elsewhere: C++ in `csrc/cpu` (CPU) and `csrc/cuda` (CUDA),
Triton from `fastopt/triton`. Fakes only check and shape, so the ops trace under
`torch.compile` and pass `torch.library.opcheck`. In-place ops return nothing.
"""

from __future__ import annotations

import torch

_lib = torch.library.Library("fastopt", "DEF")  # the namespace's one definition

_lib.define(
    "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
    "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, float lr, "
    "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, "
    "bool decoupled_weight_decay, bool amsgrad, bool maximize, Tensor? grad_scale, "
    "Tensor? found_inf) -> ()"
)

_lib.define(
    "adam_traffic_probe_(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, "
    "Tensor(c!) exp_avg_sq) -> ()"
)


def _check_same_length(reference: str, lists: dict[str, list[torch.Tensor]]) -> None:
    n = len(lists[reference])
    for name, tensors in lists.items():
        torch._check(
            len(tensors) == n,
            lambda name=name, tensors=tensors: (
                f"{name} has {len(tensors)} tensors but {reference} has {n}"
            ),
        )


@torch.library.register_fake("fastopt::adam_step_")
def _adam_step_fake(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    max_exp_avg_sqs,
    steps,
    lr,
    lr_tensor,
    beta1,
    beta2,
    eps,
    weight_decay,
    decoupled_weight_decay,
    amsgrad,
    maximize,
    grad_scale,
    found_inf,
) -> None:
    lists = {"params": params, "grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    lists["steps"] = steps
    if amsgrad:
        lists["max_exp_avg_sqs"] = max_exp_avg_sqs
    else:
        torch._check(
            len(max_exp_avg_sqs) == 0, lambda: "max_exp_avg_sqs must be empty when amsgrad=False"
        )
    _check_same_length("params", lists)
    if lr_tensor is not None and params:
        torch._check(
            lr_tensor.device.type == "cpu" or lr_tensor.device == params[0].device,
            lambda: f"lr_tensor is on {lr_tensor.device} but params are on {params[0].device}",
        )
    for i, p in enumerate(params):
        torch._check(
            p.device == params[0].device,
            lambda i=i, p=p: f"params[{i}] is on {p.device} but params[0] is on {params[0].device}",
        )
        step = steps[i]
        torch._check(
            step.numel() == 1 and step.dtype == torch.float32,
            lambda i=i, step=step: (
                f"steps[{i}] must be a one-element float32 tensor, got "
                f"{step.dtype} {tuple(step.shape)}"
            ),
        )
        for name in ("grads", "exp_avgs", "exp_avg_sqs") + (
            ("max_exp_avg_sqs",) if amsgrad else ()
        ):
            t = lists[name][i]
            torch._check(
                t.shape == p.shape and t.dtype == p.dtype,
                lambda name=name, i=i, t=t, p=p: (
                    f"{name}[{i}] is {t.dtype} {tuple(t.shape)}, params[{i}] is "
                    f"{p.dtype} {tuple(p.shape)}"
                ),
            )


@torch.library.register_fake("fastopt::adam_traffic_probe_")
def _adam_traffic_probe_fake(param, grad, exp_avg, exp_avg_sq) -> None:
    return None
