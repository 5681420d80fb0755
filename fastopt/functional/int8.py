"""The int8 layer's functional API: weight quantization and packing (done once, at conversion
time), and the fused ops ``torch.ops.fastopt.int8_mm`` / ``int8_linear`` with their autograd.

Quantization is symmetric: weights get one scale per output channel, activations one scale per
row (token), computed inside ``int8_linear``; an optional per-input-channel ``input_scale``
(SmoothQuant) multiplies the input before that. ``fastopt.nn.Int8Linear`` is the layer.

As the block-sparse layer: the kernels (C++ for CPU tensors, Triton for CUDA ones, see
`_layers`), the op with its autograd registered here, the Module in ``fastopt.nn``, the model-wide
helper ``fastopt.nn.quantize_``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _library
from . import _layers

__all__ = [
    "dequantize_weight",
    "int8_linear",
    "int8_mm",
    "pack_int8_weight",
    "quantize_per_channel",
    "smoothing_scale",
    "unpack_int8_weight",
    "uses_weight_only_path",
]

BLOCK_N, GROUP_K = _library.INT8_BLOCK_N, _library.INT8_GROUP_K  # the packed layout
# Up to this many rows, dynamic mode runs the weight-only kernel (weights widened in registers,
# float math). On a GPU that regime is memory-bound, so int8 activations would buy nothing. On
# the CPU the int8 GEMM multiplies 64 byte pairs per instruction while the weight-only kernel
# widens every weight and multiplies in fp32, so the int8 GEMM stays ahead even at one row (the
# CPU rows of benchmarks/test_int8_linear.py measure it), and dynamic mode never switches.
WEIGHT_ONLY_MAX_ROWS = {"cpu": 0, "cuda": 16}
_OPS = ("int8_mm", "int8_linear")


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization of a [N, K] float weight, one scale per output channel:
    ``scale = max|w[n]| / 127`` (1 for an all-zero row) and ``q = round(w / scale)``.

    Returns ``(q, scale)``: int8 [N, K] and float32 [N].

    >>> import torch, fastopt
    >>> q, scale = fastopt.functional.quantize_per_channel(torch.tensor([[0.5, -1.0], [2.0, 0.0]]))
    >>> q
    tensor([[  64, -127],
            [ 127,    0]], dtype=torch.int8)
    >>> scale * 127
    tensor([1., 2.])
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 2-d float tensor, got {weight.dtype} {weight.shape}")
    w = weight.detach().float()
    # amax over an empty dim is an error: a layer with no input features gets scales of 1.
    amax = w.abs().amax(dim=1) if w.shape[1] else w.new_zeros(w.shape[0])
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def smoothing_scale(input_absmax: Tensor, weight: Tensor, alpha: float = 0.5) -> Tensor:
    """SmoothQuant's per-input-channel scale ``s = max|x_k|^alpha / max|w_k|^(1 - alpha)``.

    The layer computes ``(x / s) @ (w * s).T``: the same product, with activation outliers moved
    into the weight, where per-channel scales absorb them. Returns float32 [K].

    >>> import torch, fastopt
    >>> weight = torch.tensor([[1.0, 4.0], [-1.0, 1.0]])
    >>> fastopt.functional.smoothing_scale(torch.tensor([16.0, 1.0]), weight, alpha=0.5)
    tensor([4.0000, 0.5000])
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    k = weight.shape[1]
    if input_absmax.shape != (k,):
        raise ValueError(
            f"input_absmax must have one entry per input feature, [{k}], got "
            f"{list(input_absmax.shape)}; collect it with fastopt.nn.calibrate"
        )
    x_max = input_absmax.detach().float().to(weight.device).clamp(min=1e-5)
    w_max = weight.detach().float().abs().amax(dim=0).clamp(min=1e-5)
    return x_max.pow(alpha) / w_max.pow(1.0 - alpha)


def dequantize_weight(
    weight: Tensor,
    weight_scale: Tensor,
    input_scale: Tensor | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The [N, K] weight an int8 layer multiplies by, in `dtype`:
    ``weight * weight_scale[:, None]``, times ``input_scale`` per input channel when smoothing
    folded that into the input.

    >>> import torch, fastopt
    >>> q = torch.tensor([[127, -64]], dtype=torch.int8)
    >>> fastopt.functional.dequantize_weight(q, torch.tensor([0.5]))
    tensor([[ 63.5000, -32.0000]])
    """
    dequantized = weight.to(dtype) * weight_scale.to(dtype)[:, None]
    return dequantized if input_scale is None else dequantized * input_scale.to(dtype)


def pack_int8_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """The int8 [N, K] weight in the kernels' packed layout, and its compensation.

    Returns ``(packed, compensation)``: ``packed`` is int8 [ceil(N/16), ceil(K/4), 16, 4], the
    weight zero-padded and cut into blocks of 16 output by 4 input channels (64 contiguous bytes,
    one vpdpbusd operand); ``compensation`` is int32 [N], ``128 * weight.sum(1)``, which the
    AVX-512 VNNI kernel subtracts after multiplying activations offset to unsigned by +128.

    >>> import torch, fastopt
    >>> weight = torch.randint(-127, 128, (20, 10), dtype=torch.int8)
    >>> packed, compensation = fastopt.functional.pack_int8_weight(weight)
    >>> packed.shape, compensation.shape
    (torch.Size([2, 3, 16, 4]), torch.Size([20]))
    """
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-d int8 tensor, got {weight.dtype} {weight.shape}")
    n, k = weight.shape
    n16, k4 = -(-n // BLOCK_N) * BLOCK_N, -(-k // GROUP_K) * GROUP_K
    padded = torch.nn.functional.pad(weight, (0, k4 - k, 0, n16 - n))
    packed = padded.view(n16 // BLOCK_N, BLOCK_N, k4 // GROUP_K, GROUP_K).transpose(1, 2)
    compensation = weight.sum(dim=1, dtype=torch.int32) * 128
    return packed.contiguous(), compensation


def unpack_int8_weight(packed: Tensor, out_features: int, in_features: int) -> Tensor:
    """The int8 [out_features, in_features] weight that `pack_int8_weight` packed.

    >>> import torch, fastopt
    >>> weight = torch.randint(-127, 128, (20, 10), dtype=torch.int8)
    >>> packed, _ = fastopt.functional.pack_int8_weight(weight)
    >>> torch.equal(fastopt.functional.unpack_int8_weight(packed, 20, 10), weight)
    True
    """
    blocks, groups = packed.shape[:2]
    plain = packed.transpose(1, 2).reshape(blocks * BLOCK_N, groups * GROUP_K)
    return plain[:out_features, :in_features].contiguous()


def int8_mm(
    input: Tensor, packed_weight: Tensor, weight_compensation: Tensor, in_features: int
) -> Tensor:
    """The exact int32 product ``input @ weight.T`` of an int8 [M, K] input and the int8
    [N, in_features] weight packed by `pack_int8_weight`. Returns int32 [M, N].

    >>> import torch, fastopt
    >>> x = torch.randint(-127, 128, (3, 10), dtype=torch.int8)
    >>> weight = torch.randint(-127, 128, (20, 10), dtype=torch.int8)
    >>> packed, compensation = fastopt.functional.pack_int8_weight(weight)
    >>> y = fastopt.functional.int8_mm(x, packed, compensation, 10)
    >>> torch.equal(y, x.int() @ weight.int().T)  # exact int32 sums
    True
    """
    _layers.require_kernels(input.device, "int8_mm", "int8_linear")
    args = (input, packed_weight, weight_compensation, in_features)
    return _layers.call_checked(
        torch.ops.fastopt.int8_mm, lambda: _library.check_int8_mm(*args), *args
    )


def uses_weight_only_path(rows: int, device: torch.device) -> bool:
    """Whether dynamic mode runs `rows` rows on the weight-only kernel (WEIGHT_ONLY_MAX_ROWS).

    >>> import torch, fastopt
    >>> fastopt.functional.uses_weight_only_path(1, torch.device("cpu"))
    False
    >>> fastopt.functional.uses_weight_only_path(16, torch.device("cuda"))
    True
    """
    return rows <= WEIGHT_ONLY_MAX_ROWS.get(device.type, 16)


def int8_linear(
    input: Tensor,
    packed_weight: Tensor,
    weight_compensation: Tensor,
    in_features: int,
    weight_scale: Tensor,
    bias: Tensor | None = None,
    input_scale: Tensor | None = None,
    *,
    mode: str = "dynamic",
    activation: str = "none",
) -> Tensor:
    """``F.linear`` with an int8 weight: ``y = (x * input_scale) @ (q * weight_scale[:, None]).T
    + bias``, in the input's dtype (float32, bfloat16 or float16), for any batch shape [..., K].
    ``activation="gelu"`` applies ``torch.nn.functional.gelu`` (the erf form) to ``y`` in the
    kernel's epilogue, in float32 before the cast to the output dtype: one pass over the output
    instead of two.

    ``mode="dynamic"`` (W8A8): each row of ``x * input_scale`` is quantized to int8 with its own
    scale (``max|row| / 127``, round half to even), multiplied with the int8 weight in exact int32
    sums, then scaled by both scales, biased and cast, in one fused op. Up to
    ``WEIGHT_ONLY_MAX_ROWS`` rows (the memory-bound regime) take the weight-only path instead.
    ``mode="weight_only"``: activations stay float; the weight is widened in registers.

    Gradients flow to ``input`` and ``bias`` (the quantized weight is frozen): the input's uses
    the dequantized weight, treating the activation rounding as identity; the bias's is
    ``grad_output`` summed over all but the last dimension, as ``F.linear``'s. With an
    activation, the backward recomputes the pre-activation output (one more forward) and applies
    the activation's derivative first.

    ``fastopt.nn.Int8Linear`` holds these arguments; called directly:

    >>> import torch, fastopt
    >>> linear = torch.nn.Linear(64, 32)
    >>> q, scale = fastopt.functional.quantize_per_channel(linear.weight)
    >>> packed, compensation = fastopt.functional.pack_int8_weight(q)
    >>> x = torch.randn(8, 64)
    >>> y = fastopt.functional.int8_linear(x, packed, compensation, 64, scale, linear.bias)
    >>> y.shape, y.dtype
    (torch.Size([8, 32]), torch.float32)
    >>> bool(((y - linear(x)).norm() / linear(x).norm()) < 0.05)  # int8 rounding
    True
    >>> z = fastopt.functional.int8_linear(
    ...     x, packed, compensation, 64, scale, linear.bias, activation="gelu"
    ... )
    >>> torch.allclose(z, torch.nn.functional.gelu(y), atol=1e-6)
    True
    """
    if mode not in ("dynamic", "weight_only"):
        raise ValueError(f"mode must be 'dynamic' or 'weight_only', got {mode!r}")
    _library.check_int8_activation(activation)
    _layers.require_kernels(input.device, "int8_linear", "int8_linear")
    rows = input.numel() // max(input.shape[-1], 1) if input.dim() else 0
    quantize_input = mode == "dynamic" and not uses_weight_only_path(rows, input.device)
    args = (input, packed_weight, weight_compensation, in_features, weight_scale, bias, input_scale)
    call = (
        torch.ops.fastopt.int8_linear.default,
        lambda: _library.check_int8_linear(*args, activation),
        *args,
        quantize_input,
        activation,
    )
    if _builds_no_graph(input, bias):
        # Nothing to differentiate: skip the op's autograd kernel, which torch.library runs in
        # Python (microseconds a call, a visible share of a one-row layer's time).
        with torch._C._AutoDispatchBelowAutograd():
            return _layers.call_checked(*call)
    return _layers.call_checked(*call)


def _builds_no_graph(input: Tensor, bias: Tensor | None) -> bool:
    """Whether a call on these tensors records no autograd graph (and is not being traced)."""
    if torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    return not (input.requires_grad or (bias is not None and bias.requires_grad))


def _int8_linear_setup_context(ctx, inputs, output) -> None:
    (input, packed_weight, weight_compensation, in_features, weight_scale, bias, input_scale,
     ctx.quantize_input, *activation) = inputs  # fmt: skip
    ctx.activation = activation[0] if activation else "none"  # a schema default may be left out
    ctx.options = 1 + len(activation)  # the inputs after input_scale, which get no gradient
    # With an activation, the backward recomputes the pre-activation output from the input.
    recomputed = (input, bias) if ctx.activation != "none" else (None, None)
    ctx.save_for_backward(
        packed_weight, weight_compensation, weight_scale, input_scale, *recomputed
    )
    ctx.in_features = in_features
    ctx.out_features = weight_compensation.shape[0]


def _pre_activation_grad(ctx, grad_output: Tensor) -> Tensor:
    """The gradient of the loss with respect to the output before the activation."""
    packed_weight, weight_compensation, weight_scale, input_scale, input, bias = ctx.saved_tensors
    pre_activation = torch.ops.fastopt.int8_linear(
        input,
        packed_weight,
        weight_compensation,
        ctx.in_features,
        weight_scale,
        bias,
        input_scale,
        ctx.quantize_input,
    )
    return torch.ops.aten.gelu_backward(grad_output, pre_activation)


def _int8_linear_backward(ctx, grad_output):
    packed_weight, _, weight_scale, input_scale = ctx.saved_tensors[:4]
    if ctx.activation != "none":
        grad_output = _pre_activation_grad(ctx, grad_output)
    grad_input = grad_bias = None
    if ctx.needs_input_grad[0]:
        # In float32, or float64 for float64 inputs (which gradcheck checks).
        dtype = torch.promote_types(grad_output.dtype, torch.float32)
        weight = unpack_int8_weight(packed_weight, ctx.out_features, ctx.in_features)
        dequantized = dequantize_weight(weight, weight_scale, input_scale, dtype)
        grad_input = (grad_output.to(dtype) @ dequantized).to(grad_output.dtype)
    if ctx.needs_input_grad[5]:
        grad_bias = _layers.bias_grad(grad_output)
    return (grad_input, None, None, None, None, grad_bias, None) + (None,) * ctx.options


torch.library.register_autograd(
    "fastopt::int8_linear", _int8_linear_backward, setup_context=_int8_linear_setup_context
)
_layers.register_triton_kernels("int8_linear", _OPS)
