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


# ---- block-sparse linear (fastopt.nn.BlockSparseLinear) ----------------------------------------
# W [out, in] is stored as blocks `values` [nnz, B, B] with two indexes over its block grid:
# block-CSR over block rows (crow_indices, col_indices, and row_indices: the block row of each
# stored block), and the transposed one over block columns (ccol_indices, t_row_indices, and
# t_block_indices: the position in `values` of each entry). See fastopt.blocksparse.

_lib.define(
    "blocksparse_linear(Tensor input, Tensor values, Tensor? bias, Tensor crow_indices, "
    "Tensor col_indices, Tensor row_indices, Tensor ccol_indices, Tensor t_row_indices, "
    "Tensor t_block_indices) -> Tensor"
)
_lib.define(
    "blocksparse_linear_grad_input(Tensor grad_output, Tensor values, Tensor ccol_indices, "
    "Tensor t_row_indices, Tensor t_block_indices) -> Tensor"
)
_lib.define(
    "blocksparse_linear_grad_values(Tensor grad_output, Tensor input, Tensor row_indices, "
    "Tensor col_indices, int block_size) -> Tensor"
)


def _check_features(op: str, name: str, t: torch.Tensor, features: int, like: torch.Tensor):
    torch._check(
        t.dim() >= 1 and t.shape[-1] == features,
        lambda: f"{op}: {name} must end in {features} features, got shape {tuple(t.shape)}",
    )
    torch._check(
        t.dtype == like.dtype and t.device == like.device,
        lambda: (
            f"{op}: {name} is {t.dtype} on {t.device}, the weight {like.dtype} on {like.device}"
        ),
    )


def _check_blocks(op: str, values: torch.Tensor, nnz: int) -> int:
    torch._check(
        values.dim() == 3 and values.shape[1] == values.shape[2] and values.shape[0] == nnz,
        lambda: f"{op}: values must be [{nnz}, B, B], got {tuple(values.shape)}",
    )
    return values.shape[1]


@torch.library.register_fake("fastopt::blocksparse_linear")
def _blocksparse_linear_fake(
    input, values, bias, crow_indices, col_indices, row_indices, ccol_indices, t_row_indices,
    t_block_indices,
):  # fmt: skip
    op = "blocksparse_linear"
    block = _check_blocks(op, values, col_indices.shape[0])
    _check_features(op, "input", input, (ccol_indices.shape[0] - 1) * block, values)
    out_features = (crow_indices.shape[0] - 1) * block
    if bias is not None:
        torch._check(bias.dim() == 1, lambda: f"{op}: bias must be 1-D")
        _check_features(op, "bias", bias, out_features, values)
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("fastopt::blocksparse_linear_grad_input")
def _blocksparse_linear_grad_input_fake(
    grad_output, values, ccol_indices, t_row_indices, t_block_indices
):
    op = "blocksparse_linear_grad_input"
    block = _check_blocks(op, values, t_row_indices.shape[0])
    torch._check(
        grad_output.dim() >= 1 and grad_output.shape[-1] % block == 0,
        lambda: f"{op}: grad_output must end in a multiple of {block} features",
    )
    _check_features(op, "grad_output", grad_output, grad_output.shape[-1], values)
    return grad_output.new_empty((*grad_output.shape[:-1], (ccol_indices.shape[0] - 1) * block))


@torch.library.register_fake("fastopt::blocksparse_linear_grad_values")
def _blocksparse_linear_grad_values_fake(grad_output, input, row_indices, col_indices, block_size):
    op = "blocksparse_linear_grad_values"
    for name, t in (("input", input), ("grad_output", grad_output)):
        torch._check(
            t.dim() >= 1 and t.shape[-1] % block_size == 0,
            lambda name=name: f"{op}: {name} must end in a multiple of {block_size} features",
        )
    _check_features(op, "grad_output", grad_output, grad_output.shape[-1], input)
    torch._check(
        input.shape[:-1] == grad_output.shape[:-1],
        lambda: f"{op}: input and grad_output must have the same batch shape",
    )
    torch._check(
        row_indices.shape == col_indices.shape,
        lambda: f"{op}: row_indices and col_indices differ in length",
    )
    return input.new_empty((col_indices.shape[0], block_size, block_size))
