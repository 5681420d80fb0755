"""Every fastopt op: its schema and its fake (meta) implementation, defined once.

Kernels are registered per device elsewhere: C++ in `csrc/cpu` (CPU) and `csrc/cuda` (CUDA),
Triton from `fastopt/triton`. Fakes only check and shape, so the ops trace under
`torch.compile` and pass `torch.library.opcheck`. In-place ops return nothing.
"""

from __future__ import annotations

import torch

_lib = torch.library.Library("fastopt", "DEF")  # the namespace's one definition

# The arguments every multi-tensor optimizer op ends with.
_STEP_TAIL = "Tensor? grad_scale, Tensor? found_inf) -> ()"

_lib.define(
    "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
    "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] steps, float lr, "
    "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, "
    "bool decoupled_weight_decay, bool amsgrad, bool maximize, " + _STEP_TAIL
)
_lib.define(
    "rmsprop_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
    "Tensor(d!)[] momentum_buffers, Tensor(e!)[] grad_avgs, Tensor(f!)[] steps, float lr, "
    "Tensor? lr_tensor, float alpha, float eps, float weight_decay, float momentum, "
    "bool centered, bool maximize, " + _STEP_TAIL
)
_lib.define(
    "adagrad_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] state_sums, "
    "Tensor(d!)[] steps, float lr, Tensor? lr_tensor, float lr_decay, float weight_decay, "
    "float eps, bool maximize, " + _STEP_TAIL
)
_lib.define(
    "adadelta_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] square_avgs, "
    "Tensor(d!)[] acc_deltas, Tensor(e!)[] steps, float lr, Tensor? lr_tensor, float rho, "
    "float eps, float weight_decay, bool maximize, " + _STEP_TAIL
)
# `grad` is a sparse COO gradient; it is written only to store its values back unscaled.
_lib.define(
    "sparse_adagrad_step_(Tensor(a!) param, Tensor(b!) grad, Tensor(c!) state_sum, "
    "Tensor(d!) step, float lr, Tensor? lr_tensor, float lr_decay, float eps, bool maximize, "
    + _STEP_TAIL
)
# The roofline of the optimizer benchmarks: reads each `updated` and `read` tensor once and
# writes each `updated` one once, with the kernels' own loop (float32, contiguous, one size).
_lib.define("traffic_probe_(Tensor(a!)[] updated, Tensor[] read) -> ()")


def _check_step_lists(
    params: list[torch.Tensor],
    per_param: dict[str, list[torch.Tensor]],
    steps: list[torch.Tensor],
    lr_tensor: torch.Tensor | None,
) -> None:
    """What the kernels check of a multi-tensor step, on fake tensors: list lengths, one device,
    float32 step counters, and per-param tensors of the param's shape and dtype."""
    for name, tensors in {**per_param, "steps": steps}.items():
        torch._check(
            len(tensors) == len(params),
            lambda name=name, tensors=tensors: (
                f"{name} has {len(tensors)} tensors but params has {len(params)}"
            ),
        )
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
        for name, tensors in per_param.items():
            t = tensors[i]
            torch._check(
                t.shape == p.shape and t.dtype == p.dtype,
                lambda name=name, i=i, t=t, p=p: (
                    f"{name}[{i}] is {t.dtype} {tuple(t.shape)}, params[{i}] is "
                    f"{p.dtype} {tuple(p.shape)}"
                ),
            )


def _optional_state(name: str, tensors: list[torch.Tensor], used: bool, needs: str) -> dict:
    """`{name: tensors}` where the option that needs them is on; else checks that they are
    absent."""
    if used:
        return {name: tensors}
    torch._check(len(tensors) == 0, lambda: f"{name} must be empty without {needs}")
    return {}


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
    per_param = {"grads": grads, "exp_avgs": exp_avgs, "exp_avg_sqs": exp_avg_sqs}
    per_param |= _optional_state("max_exp_avg_sqs", max_exp_avg_sqs, amsgrad, "amsgrad=True")
    _check_step_lists(params, per_param, steps, lr_tensor)


@torch.library.register_fake("fastopt::rmsprop_step_")
def _rmsprop_step_fake(
    params,
    grads,
    square_avgs,
    momentum_buffers,
    grad_avgs,
    steps,
    lr,
    lr_tensor,
    alpha,
    eps,
    weight_decay,
    momentum,
    centered,
    maximize,
    grad_scale,
    found_inf,
) -> None:
    per_param = {"grads": grads, "square_avgs": square_avgs}
    per_param |= _optional_state("momentum_buffers", momentum_buffers, momentum > 0, "momentum > 0")
    per_param |= _optional_state("grad_avgs", grad_avgs, centered, "centered=True")
    _check_step_lists(params, per_param, steps, lr_tensor)


@torch.library.register_fake("fastopt::adagrad_step_")
def _adagrad_step_fake(
    params,
    grads,
    state_sums,
    steps,
    lr,
    lr_tensor,
    lr_decay,
    weight_decay,
    eps,
    maximize,
    grad_scale,
    found_inf,
) -> None:
    _check_step_lists(params, {"grads": grads, "state_sums": state_sums}, steps, lr_tensor)


@torch.library.register_fake("fastopt::adadelta_step_")
def _adadelta_step_fake(
    params,
    grads,
    square_avgs,
    acc_deltas,
    steps,
    lr,
    lr_tensor,
    rho,
    eps,
    weight_decay,
    maximize,
    grad_scale,
    found_inf,
) -> None:
    per_param = {"grads": grads, "square_avgs": square_avgs, "acc_deltas": acc_deltas}
    _check_step_lists(params, per_param, steps, lr_tensor)


@torch.library.register_fake("fastopt::sparse_adagrad_step_")
def _sparse_adagrad_step_fake(
    param,
    grad,
    state_sum,
    step,
    lr,
    lr_tensor,
    lr_decay,
    eps,
    maximize,
    grad_scale,
    found_inf,
) -> None:
    torch._check(grad.is_sparse, lambda: "grad must be a sparse COO tensor")
    for name, t in (("grad", grad), ("state_sum", state_sum)):
        torch._check(
            t.shape == param.shape and t.dtype == param.dtype,
            lambda name=name, t=t: (
                f"{name} is {t.dtype} {tuple(t.shape)}, param is {param.dtype} {tuple(param.shape)}"
            ),
        )
    torch._check(
        step.numel() == 1 and step.dtype == torch.float32,
        lambda: f"step must be a one-element float32 tensor, got {step.dtype} {tuple(step.shape)}",
    )


@torch.library.register_fake("fastopt::traffic_probe_")
def _traffic_probe_fake(updated, read) -> None:
    return None
