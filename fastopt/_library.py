"""Every fastopt op: its schema and its fake (meta) implementation, defined once.

Kernels are registered per device elsewhere: C++ from the `cpu` (CPU) and `cuda` (CUDA) folders
of `csrc/`, Triton from `fastopt/triton`. Fakes only check and shape, so the ops trace under
`torch.compile` and pass `torch.library.opcheck`. In-place ops return nothing.
"""

from __future__ import annotations

import torch

from ._step_ops import STEP_OPS

_lib = torch.library.Library("fastopt", "DEF")  # the namespace's one definition

# The multi-tensor optimizer ops, from their table. Their fake is a C++ Meta kernel
# (csrc/optim/meta_step_ops.cpp) that runs the very checks of the CPU and CUDA kernels.
for _op in STEP_OPS:
    _lib.define(_op.schema)
# `grad` is a sparse COO gradient; it is written only to store its values back unscaled.
_lib.define(
    "sparse_adagrad_step_(Tensor(a!) param, Tensor(b!) grad, Tensor(c!) state_sum, "
    "Tensor(d!) step, float lr, Tensor? lr_tensor, float lr_decay, float eps, bool maximize, "
    "Tensor? grad_scale, Tensor? found_inf) -> ()"
)
# The roofline of the optimizer benchmarks: reads each `updated` and `read` tensor once and
# writes each `updated` one once (leaving them as they were), with the kernels' own partition and
# loop (float32 or bfloat16 tensors, contiguous; one bfloat16 read stream at most). Each list holds
# its streams one after the other, `tensors` tensors each (tensor i of one size in every stream);
# `prefetch` picks the loop form. With no updated stream it only reads, and writes the sum of what
# it read into `total` (one float32 element).
_lib.define(
    "traffic_probe_(Tensor(a!)[] updated, Tensor[] read, int tensors=1, bool prefetch=True, "
    "Tensor(b!)? total=None) -> ()"
)


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
def _traffic_probe_fake(updated, read, tensors=1, prefetch=True, total=None) -> None:
    return None


# ---- the total norm of many tensors: fastopt.clip_grad_norm_ and the optimizers' clipping. -----
# Each tensor divided by grad_scale first (GradScaler's scale, read on the device); a 0-dim
# float32 result (float64 if any tensor is float64) on the tensors' device. Its fake is a C++
# Meta kernel (csrc/optim/grad_norm_meta.cpp) that runs the very checks of the CPU and CUDA ones.
_lib.define("grad_norm(Tensor[] tensors, float norm_type, Tensor? grad_scale) -> Tensor")


# ---- int8 linear layers: fastopt.functional.int8 wraps these. The packed weight layout
# ([N/16, K/4, 16, 4] int8) is shared by every device; csrc/layers/cpu/int8_tiles.h defines it,
# and a test checks these constants against the built module's (fastopt._C.INT8_*).

INT8_BLOCK_N = 16  # output channels per packed block
INT8_GROUP_K = 4  # input channels per packed group
INT8_MAX_IN_FEATURES = 65536  # beyond, int32 sums of int8 products could overflow
# The activations int8_linear can apply to its fp32 output before the cast: "gelu" is
# torch.nn.functional.gelu (the erf form). csrc/layers/cpu/activation.h parses the same names.
INT8_ACTIVATIONS = ("none", "gelu")

# The dtypes each device's kernels take (meta tensors, which only trace, take any of them).
_LAYER_DTYPES = {
    "int8_linear": {
        "cpu": (torch.float32, torch.bfloat16, torch.float16, torch.float64),
        "cuda": (torch.float32, torch.bfloat16, torch.float16),
    },
    "blocksparse_linear": {
        "cpu": (torch.float32, torch.bfloat16, torch.float64),
        "cuda": (torch.float32, torch.bfloat16, torch.float16),
    },
}
_BLOCKSPARSE_BLOCKS = {"cpu": (16, 32, 64), "cuda": (16, 32, 64, 128)}


def _names(dtypes) -> str:
    names = [str(d).removeprefix("torch.") for d in dtypes]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _check_layer_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """`t` has a dtype the kernels of `op` take on its device."""
    by_device = _LAYER_DTYPES[op]
    dtypes = by_device.get(t.device.type, by_device["cpu"] + by_device["cuda"])
    torch._check(
        t.dtype in dtypes,
        lambda: (
            f"fastopt.{op}: {name} is {t.dtype}, but the {t.device.type} kernels take "
            f"{_names(dtypes)}; convert it with .to(torch.float32)"
        ),
    )


_lib.define(
    "int8_mm(Tensor input, Tensor packed_weight, Tensor weight_compensation, int in_features) "
    "-> Tensor"
)
_lib.define(
    "int8_linear(Tensor input, Tensor packed_weight, Tensor weight_compensation, int in_features, "
    "Tensor weight_scale, Tensor? bias, Tensor? input_scale, bool quantize_input, "
    'str activation="none") -> Tensor'
)


def _check_int8_packed_weight(op, input, packed_weight, weight_compensation, in_features) -> None:
    torch._check(
        packed_weight.dtype == torch.int8
        and packed_weight.dim() == 4
        and tuple(packed_weight.shape[2:]) == (INT8_BLOCK_N, INT8_GROUP_K),
        lambda: (
            f"{op}: packed_weight must be the int8 [N/16, K/4, 16, 4] tensor of "
            f"fastopt.functional.pack_int8_weight, got {packed_weight.dtype} "
            f"{list(packed_weight.shape)}"
        ),
    )
    torch._check(
        packed_weight.is_contiguous(),
        lambda: (
            f"{op}: packed_weight must be contiguous (the kernels read its [N/16, K/4, 16, 4] "
            f"layout as plain bytes), got strides {list(packed_weight.stride())}; pass "
            "packed_weight.contiguous()"
        ),
    )
    features = input.shape[-1] if input.dim() else 0
    torch._check(
        input.dim() >= 1 and features == in_features,
        lambda: (
            f"{op}: input has {features} features (its last dimension) but the layer has "
            f"in_features={in_features}; pass an input of shape [..., {in_features}]"
        ),
    )
    groups = packed_weight.shape[1]
    torch._check(
        (in_features + INT8_GROUP_K - 1) // INT8_GROUP_K == groups,
        lambda: (
            f"{op}: packed_weight holds {groups} groups of 4 input features, which does not fit "
            f"in_features={in_features}; pack the weight with fastopt.functional.pack_int8_weight"
        ),
    )
    torch._check(
        in_features <= INT8_MAX_IN_FEATURES,
        lambda: (
            f"{op}: in_features {in_features} is above {INT8_MAX_IN_FEATURES}, where int32 sums "
            "of int8 products could overflow"
        ),
    )
    torch._check(
        weight_compensation.dtype == torch.int32
        and weight_compensation.dim() == 1
        and (weight_compensation.shape[0] + INT8_BLOCK_N - 1) // INT8_BLOCK_N
        == packed_weight.shape[0]
        and weight_compensation.is_contiguous(),
        lambda: (
            f"{op}: weight_compensation must be the int32 [out_features] tensor of "
            f"fastopt.functional.pack_int8_weight for this packed_weight, got "
            f"{weight_compensation.dtype} {list(weight_compensation.shape)}"
        ),
    )
    for t in (packed_weight, weight_compensation):
        torch._check(
            t.device == input.device,
            lambda t=t: (
                f"{op}: the weight tensors are on {t.device} but input is on {input.device}; "
                "move the layer to the input's device"
            ),
        )


@torch.library.register_fake("fastopt::int8_mm")
def _int8_mm_fake(input, packed_weight, weight_compensation, in_features):
    check_int8_mm(input, packed_weight, weight_compensation, in_features)
    return input.new_empty((input.shape[0], weight_compensation.shape[0]), dtype=torch.int32)


def check_int8_mm(input, packed_weight, weight_compensation, in_features) -> None:
    """The checks of fastopt::int8_mm's arguments, naming the argument and the fix: run by its
    fake, its Triton launcher and fastopt.functional.int8_mm (before the CPU kernel)."""
    torch._check(
        input.dtype == torch.int8 and input.dim() == 2,
        lambda: (
            f"fastopt.int8_mm: input must be a 2-d int8 tensor, got {input.dtype} "
            f"{list(input.shape)}"
        ),
    )
    _check_int8_packed_weight(
        "fastopt.int8_mm", input, packed_weight, weight_compensation, in_features
    )


@torch.library.register_fake("fastopt::int8_linear")
def _int8_linear_fake(
    input,
    packed_weight,
    weight_compensation,
    in_features,
    weight_scale,
    bias,
    input_scale,
    quantize_input,
    activation="none",
):
    check_int8_linear(
        input,
        packed_weight,
        weight_compensation,
        in_features,
        weight_scale,
        bias,
        input_scale,
        activation,
    )
    return input.new_empty((*input.shape[:-1], weight_compensation.shape[0]))


def check_int8_linear(
    input,
    packed_weight,
    weight_compensation,
    in_features,
    weight_scale,
    bias,
    input_scale,
    activation="none",
) -> None:
    """The checks of fastopt::int8_linear's arguments, naming the argument and the fix: run by its
    fake, its Triton launcher and fastopt.functional.int8_linear (before the CPU kernel)."""
    op = "fastopt.int8_linear"
    check_int8_activation(activation)
    _check_layer_dtype("int8_linear", "input", input)
    _check_int8_packed_weight(op, input, packed_weight, weight_compensation, in_features)
    n, k = weight_compensation.shape[0], input.shape[-1]
    device = input.device
    scale_of = "a float32 [{}] tensor on the input's device".format
    _check_vector(op, "weight_scale", weight_scale, torch.float32, n, device, scale_of(n))
    if bias is not None:
        what = f"a [{n}] tensor of the input's dtype {input.dtype} on its device"
        _check_vector(op, "bias", bias, input.dtype, n, device, what)
    if input_scale is not None:
        _check_vector(op, "input_scale", input_scale, torch.float32, k, device, scale_of(k))


def check_int8_activation(activation: str) -> None:
    """`activation` is one of INT8_ACTIVATIONS (a ValueError otherwise, as for a bad `mode`)."""
    if activation not in INT8_ACTIVATIONS:
        raise ValueError(
            f"fastopt.int8_linear: activation must be one of {INT8_ACTIVATIONS}, got "
            f"{activation!r}; apply other activations after the layer"
        )


def _check_vector(op, name, t, dtype, length, device, what) -> None:
    """`t` is a 1-d tensor of `length` elements of `dtype` on `device`, which `what` says."""
    torch._check(
        t.dtype == dtype and t.dim() == 1 and t.shape[0] == length and t.device == device,
        lambda: f"{op}: {name} must be {what}, got {t.dtype} {list(t.shape)} on {t.device}",
    )


# ---- block-sparse linear (fastopt.nn.BlockSparseLinear) ----------------------------------------
# W [out, in] is stored as blocks `values` [nnz, B, B] with two indexes over its block grid:
# block-CSR over block rows (crow_indices, col_indices, and row_indices: the block row of each
# stored block), and the transposed one over block columns (ccol_indices, t_row_indices, and
# t_block_indices: the position in `values` of each entry). See fastopt.functional.blocksparse.

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
            f"{op}: {name} is {t.dtype} on {t.device}, the weight {like.dtype} on {like.device}; "
            f"pass {name} of the weight's dtype and device"
        ),
    )


def _check_block_size(op: str, block: int, device: torch.device) -> None:
    sizes = _BLOCKSPARSE_BLOCKS.get(device.type, _BLOCKSPARSE_BLOCKS["cuda"])
    torch._check(
        block in sizes,
        lambda: (
            f"{op}: the {device.type} kernels take block sizes {', '.join(map(str, sizes))}, got "
            f"{block}; pick one of those as block_size"
        ),
    )


def check_blocksparse_kernels(op: str, name: str, t: torch.Tensor, block: int) -> None:
    """What the kernels of `t`'s device take: its dtype and the block size. Run by the fakes and
    the CPU path; the Triton launchers, which tests also run on CPU tensors, check their own."""
    _check_block_size(op, block, t.device)
    _check_layer_dtype("blocksparse_linear", name, t)


def _check_blocks(op: str, values: torch.Tensor, nnz: int) -> int:
    torch._check(
        values.dim() == 3 and values.shape[1] == values.shape[2] and values.shape[0] == nnz,
        lambda: f"{op}: values must be [{nnz}, B, B], got {tuple(values.shape)}",
    )
    return values.shape[1]


def _check_index(op: str, name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    torch._check(
        t.dim() == 1 and t.dtype == torch.int64 and t.device == like.device,
        lambda: (
            f"{op}: {name} must be a 1-D int64 tensor on {like.device}, got {t.dtype} "
            f"{tuple(t.shape)} on {t.device}"
        ),
    )
    torch._check(
        t.is_contiguous(),
        lambda: f"{op}: {name} must be contiguous (stride 1); pass {name}.contiguous()",
    )


def check_blocksparse_linear(
    input, values, bias, crow_indices, col_indices, row_indices, ccol_indices, t_row_indices,
    t_block_indices,
) -> tuple[int, int]:  # fmt: skip
    """The checks of fastopt::blocksparse_linear's arguments (shapes, dtypes, devices), naming the
    argument and the fix: run by its fake, its Triton launcher and
    fastopt.functional.blocksparse_linear (before the CPU kernel). Returns (block size,
    out_features)."""
    op = "fastopt.blocksparse_linear"
    block = _check_blocks(op, values, col_indices.shape[0])
    for name, t in (
        ("crow_indices", crow_indices),
        ("col_indices", col_indices),
        ("row_indices", row_indices),
        ("ccol_indices", ccol_indices),
        ("t_row_indices", t_row_indices),
        ("t_block_indices", t_block_indices),
    ):
        _check_index(op, name, t, values)
    _check_features(op, "input", input, (ccol_indices.shape[0] - 1) * block, values)
    out_features = (crow_indices.shape[0] - 1) * block
    if bias is not None:
        torch._check(
            bias.dim() == 1,
            lambda: f"{op}: bias must be 1-D [{out_features}], got {tuple(bias.shape)}",
        )
        _check_features(op, "bias", bias, out_features, values)
    return block, out_features


def check_blocksparse_linear_grad_input(
    grad_output, values, ccol_indices, t_row_indices, t_block_indices
) -> int:
    """The checks of fastopt::blocksparse_linear_grad_input's arguments (run by its fake and its
    Triton launcher). Returns the block size."""
    op = "fastopt.blocksparse_linear_grad_input"
    block = _check_blocks(op, values, t_row_indices.shape[0])
    for name, t in (
        ("ccol_indices", ccol_indices),
        ("t_row_indices", t_row_indices),
        ("t_block_indices", t_block_indices),
    ):
        _check_index(op, name, t, values)
    torch._check(
        t_block_indices.shape[0] == t_row_indices.shape[0],
        lambda: f"{op}: t_block_indices must have one entry per block",
    )
    torch._check(
        grad_output.dim() >= 1 and grad_output.shape[-1] % block == 0,
        lambda: f"{op}: grad_output must end in a multiple of {block} features",
    )
    _check_features(op, "grad_output", grad_output, grad_output.shape[-1], values)
    return block


def check_blocksparse_linear_grad_values(
    grad_output, input, row_indices, col_indices, block_size
) -> None:
    """The checks of fastopt::blocksparse_linear_grad_values's arguments (run by its fake and its
    Triton launcher)."""
    op = "fastopt.blocksparse_linear_grad_values"
    torch._check(block_size > 0, lambda: f"{op}: block_size must be positive, got {block_size}")
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
    for name, t in (("row_indices", row_indices), ("col_indices", col_indices)):
        _check_index(op, name, t, input)
    torch._check(
        row_indices.shape == col_indices.shape,
        lambda: f"{op}: row_indices and col_indices differ in length",
    )


@torch.library.register_fake("fastopt::blocksparse_linear")
def _blocksparse_linear_fake(
    input, values, bias, crow_indices, col_indices, row_indices, ccol_indices, t_row_indices,
    t_block_indices,
):  # fmt: skip
    block, out_features = check_blocksparse_linear(
        input, values, bias, crow_indices, col_indices, row_indices, ccol_indices, t_row_indices,
        t_block_indices,
    )  # fmt: skip
    check_blocksparse_kernels("fastopt.blocksparse_linear", "values", values, block)
    return input.new_empty((*input.shape[:-1], out_features))


@torch.library.register_fake("fastopt::blocksparse_linear_grad_input")
def _blocksparse_linear_grad_input_fake(
    grad_output, values, ccol_indices, t_row_indices, t_block_indices
):
    block = check_blocksparse_linear_grad_input(
        grad_output, values, ccol_indices, t_row_indices, t_block_indices
    )
    check_blocksparse_kernels("fastopt.blocksparse_linear_grad_input", "values", values, block)
    return grad_output.new_empty((*grad_output.shape[:-1], (ccol_indices.shape[0] - 1) * block))


@torch.library.register_fake("fastopt::blocksparse_linear_grad_values")
def _blocksparse_linear_grad_values_fake(grad_output, input, row_indices, col_indices, block_size):
    check_blocksparse_linear_grad_values(grad_output, input, row_indices, col_indices, block_size)
    op = "fastopt.blocksparse_linear_grad_values"
    check_blocksparse_kernels(op, "input", input, block_size)
    return input.new_empty((col_indices.shape[0], block_size, block_size))
