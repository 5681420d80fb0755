"""``Int8Linear``: a drop-in ``nn.Linear`` with an int8 weight, and the helpers that convert a
whole model (`quantize_`) and collect SmoothQuant statistics (`calibrate`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from .._library import check_int8_activation
from ..functional import int8 as int8_ops

MODES = ("dynamic", "weight_only")


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W stored as int8, one float32 scale per output channel.

    ``mode="dynamic"`` (W8A8) quantizes each input row to int8 inside the op and runs an exact
    int8 GEMM (on CUDA, batches of up to 16 rows take the weight-only kernel; see
    ``fastopt.functional.int8.WEIGHT_ONLY_MAX_ROWS``);
    ``mode="weight_only"`` keeps activations in float. An optional per-input-channel
    ``input_scale`` (SmoothQuant, set by `from_float` from `calibrate`'s statistics) multiplies
    the input first. ``activation="gelu"`` applies ``torch.nn.functional.gelu`` (the erf form)
    to the output inside the kernel: the layer then stands for ``nn.Linear`` followed by
    ``nn.GELU()``, which `quantize_` fuses that way.

    The weight is frozen: gradients flow to the input only. The ``state_dict`` holds plain
    tensors (``weight`` int8 [out, in], ``weight_scale``, ``bias``, and ``input_scale`` when
    smoothing is on), loadable with ``torch.load(weights_only=True)``; the packed layout the
    kernels read is rebuilt from ``weight`` when a state_dict is loaded.

    Build one with `from_float`; the constructor makes an all-zero layer to load weights into.

    >>> import torch
    >>> from fastopt.nn import Int8Linear
    >>> linear = torch.nn.Linear(256, 128)
    >>> q = Int8Linear.from_float(linear)  # W8A8
    >>> q
    Int8Linear(in_features=256, out_features=128, bias=True, mode=dynamic)
    >>> x = torch.randn(4, 256)
    >>> bool(((q(x) - linear(x)).norm() / linear(x).norm()) < 0.05)
    True
    >>> weight_only = Int8Linear.from_float(linear, mode="weight_only")  # float activations
    >>> sorted(q.state_dict())  # plain tensors
    ['bias', 'weight', 'weight_scale']
    >>> linear_again = q.to_float()  # an nn.Linear with the dequantized weight
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        mode: str = "dynamic",
        smoothing: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        activation: str = "none",
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if smoothing and mode != "dynamic":
            raise ValueError("smoothing (an input_scale) only applies to mode='dynamic'")
        check_int8_activation(activation)
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.activation = activation
        packed, compensation = int8_ops.pack_int8_weight(
            torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        )
        # Derived from `weight` (see _state_dict_hook): not saved, rebuilt on load.
        self.register_buffer("packed_weight", packed, persistent=False)
        self.register_buffer("weight_compensation", compensation, persistent=False)
        self.register_buffer(
            "weight_scale", torch.ones(out_features, dtype=torch.float32, device=device)
        )
        bias_tensor = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self.register_buffer("bias", bias_tensor)
        scale = torch.ones(in_features, dtype=torch.float32, device=device) if smoothing else None
        self.register_buffer("input_scale", scale)
        self.register_state_dict_post_hook(_state_dict_hook)
        self.register_load_state_dict_pre_hook(_load_state_dict_hook)

    @classmethod
    def from_float(
        cls,
        linear: nn.Linear,
        mode: str = "dynamic",
        input_absmax: Tensor | None = None,
        alpha: float = 0.5,
        activation: str = "none",
    ) -> Int8Linear:
        """The int8 twin of `linear` (its weight quantized per output channel; bias kept in its
        dtype). `input_absmax` ([in_features], from `calibrate`) turns on SmoothQuant with
        migration strength `alpha`. ``activation="gelu"`` makes it the twin of `linear` followed
        by ``nn.GELU()``.

        >>> import torch
        >>> from fastopt.nn import Int8Linear, calibrate
        >>> model = torch.nn.Sequential(torch.nn.Linear(64, 32))
        >>> stats = calibrate(model, [torch.randn(16, 64) for _ in range(4)])
        >>> Int8Linear.from_float(model[0], input_absmax=stats["0"], alpha=0.5)
        Int8Linear(in_features=64, out_features=32, bias=True, mode=dynamic, smoothing=True)
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_float takes an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        q = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            mode=mode,
            smoothing=input_absmax is not None,
            device=weight.device,
            dtype=weight.dtype,
            activation=activation,
        )
        if input_absmax is not None:
            smooth = int8_ops.smoothing_scale(input_absmax, weight, alpha)
            weight = weight.float() * smooth
            q.input_scale.copy_(1.0 / smooth)
        int8_weight, scale = int8_ops.quantize_per_channel(weight)
        q._set_weight(int8_weight)
        q.weight_scale.copy_(scale)
        if linear.bias is not None:
            q.bias.copy_(linear.bias.detach())
        return q

    def to_float(self, dtype: torch.dtype | None = None) -> nn.Linear | nn.Sequential:
        """An ``nn.Linear`` with the dequantized weight (smoothing folded back), in `dtype`
        (default: the bias's dtype, else float32); with ``activation="gelu"``, that linear
        followed by ``nn.GELU()`` in an ``nn.Sequential``."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
        weight = int8_ops.dequantize_weight(self.weight, self.weight_scale, self.input_scale)
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=weight.device,
            dtype=dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return nn.Sequential(linear, nn.GELU()) if self.activation == "gelu" else linear

    @property
    def weight(self) -> Tensor:
        """The int8 [out_features, in_features] weight (a copy out of the packed layout)."""
        return int8_ops.unpack_int8_weight(self.packed_weight, self.out_features, self.in_features)

    def _set_weight(self, weight: Tensor) -> None:
        packed, compensation = int8_ops.pack_int8_weight(weight.to(self.packed_weight.device))
        self.packed_weight, self.weight_compensation = packed, compensation

    def _apply(self, fn, recurse=True):
        # `.to(dtype)` / `.half()` convert the bias like nn.Linear's, but the scales stay float32
        # (the kernels' contract, and their precision): they only follow the device.
        scales = {"weight_scale": self.weight_scale, "input_scale": self.input_scale}
        super()._apply(fn, recurse)
        for name, before in scales.items():
            if before is not None:
                setattr(self, name, before.to(getattr(self, name).device))
        # `.to(memory_format=torch.channels_last)` restrides every 4-d tensor, the packed weight
        # included; the kernels read its layout as contiguous bytes, so keep it contiguous.
        self.packed_weight = self.packed_weight.contiguous()
        return self

    def forward(self, input: Tensor) -> Tensor:
        # One dict for the buffers: nn.Module.__getattr__ costs about a microsecond per buffer
        # on every call, a noticeable share of a small layer's time.
        buffers = self._buffers
        return int8_ops.int8_linear(
            input,
            buffers["packed_weight"],
            buffers["weight_compensation"],
            self.in_features,
            buffers["weight_scale"],
            buffers["bias"],
            buffers["input_scale"],
            mode=self.mode,
            activation=self.activation,
        )

    def extra_repr(self) -> str:
        smoothing = ", smoothing=True" if self.input_scale is not None else ""
        activation = f", activation={self.activation}" if self.activation != "none" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, mode={self.mode}{smoothing}{activation}"
        )


def _state_dict_hook(module: Int8Linear, state_dict, prefix, local_metadata) -> None:
    state_dict[prefix + "weight"] = module.weight


def _load_state_dict_hook(
    module: Int8Linear, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
) -> None:
    key = prefix + "weight"
    if key not in state_dict:
        missing.append(key)
        return
    weight = state_dict.pop(key)
    expected = (module.out_features, module.in_features)
    if weight.dtype != torch.int8 or tuple(weight.shape) != expected:
        errors.append(
            f"{key} must be int8 {list(expected)} for this Int8Linear, got {weight.dtype} "
            f"{list(weight.shape)}"
        )
        return
    module._set_weight(weight)


def quantize_(
    model: nn.Module,
    mode: str = "dynamic",
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    input_absmax: dict[str, Tensor] | None = None,
    alpha: float = 0.5,
    fuse_activations: bool = True,
    fuse_shared_inputs: bool = False,
) -> nn.Module:
    """Replaces, in place, every ``nn.Linear`` of `model` (the model itself excluded; subclasses,
    such as nn.MultiheadAttention's ``out_proj``, are left alone) for which
    ``filter_fn(module, qualified_name)`` is true (default: all) with `Int8Linear.from_float`.
    `input_absmax` maps names to `calibrate`'s statistics, for SmoothQuant. Returns `model`.

    With `fuse_activations` (the default), one pattern is fused: an ``nn.Linear`` followed, in
    the same ``nn.Sequential``, by an ``nn.GELU()`` (approximate="none") becomes an
    ``Int8Linear(activation="gelu")``, and the ``nn.GELU`` an ``nn.Identity`` (a BERT-style
    FFN written as ``nn.Sequential(nn.Linear, nn.GELU(), nn.Linear)``). The GELU then runs in the
    GEMM's epilogue; the outputs are those of the unfused int8 model to float32 rounding.
    Activations called from a ``forward`` (``F.gelu(self.dense(x))``) are not seen.

    With `fuse_shared_inputs`, sibling ``nn.Linear`` children named ``query``, ``key``,
    ``value`` (or ``q_proj``, ``k_proj``, ``v_proj``) of one module, with the same input features
    and a bias all or none, become the parts of one `Int8LinearGroup` (registered on that module
    as ``query_key_value`` / ``q_proj_k_proj_v_proj``): called with one input, they quantize it
    once and share one GEMM, with the same outputs as separate int8 layers. Their outputs are
    then views into one tensor (as ``torch.split``'s), not contiguous tensors; layers with
    SmoothQuant statistics are not grouped (each has its own input scale).

    >>> import torch
    >>> from fastopt.nn import quantize_
    >>> model = torch.nn.Sequential(
    ...     torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    ... )
    >>> quantize_(model, mode="dynamic", filter_fn=lambda module, name: name != "2")
    Sequential(
      (0): Int8Linear(in_features=64, out_features=256, bias=True, mode=dynamic)
      (1): ReLU()
      (2): Linear(in_features=256, out_features=10, bias=True)
    )
    """
    targets = [
        (name, module)
        for name, module in model.named_modules()
        # Exactly nn.Linear: subclasses such as nn.MultiheadAttention's out_proj
        # (NonDynamicallyQuantizableLinear) are read by their owner through `.weight`.
        if name and type(module) is nn.Linear and (filter_fn is None or filter_fn(module, name))
    ]
    if fuse_shared_inputs:
        # Imported here: the group's module builds on Int8Linear, defined above.
        from .int8_shared_input import group_shared_inputs_

        grouped = group_shared_inputs_(model, dict(targets), mode, input_absmax or {})
        targets = [(name, linear) for name, linear in targets if name not in grouped]
    fused_gelus = _gelus_after(model, {name for name, _ in targets}) if fuse_activations else {}
    for name, linear in targets:
        absmax = input_absmax.get(name) if input_absmax is not None else None
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        activation = "gelu" if name in fused_gelus else "none"
        setattr(parent, child, Int8Linear.from_float(linear, mode, absmax, alpha, activation))
        if name in fused_gelus:
            setattr(parent, fused_gelus[name], nn.Identity())
        if isinstance(parent, nn.TransformerEncoderLayer) and not _has_fast_path_guard(parent):
            # Its inference fast path (torch._transformer_encoder_layer_fwd) reads linear1.weight
            # and linear2.weight itself; a forward pre-hook is what makes it take the regular
            # path, which calls the layers.
            parent.register_forward_pre_hook(_keep_off_the_fast_path)
    return model


def _gelus_after(model: nn.Module, linears: set[str]) -> dict[str, str]:
    """For each of the `linears` (qualified names) that an ``nn.GELU()`` follows in an
    ``nn.Sequential``, the child name of that GELU in the same Sequential."""
    fused = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        for (name, _), (next_name, next_module) in zip(children, children[1:], strict=False):
            qualified = f"{parent_name}.{name}" if parent_name else name
            is_gelu = type(next_module) is nn.GELU and next_module.approximate == "none"
            if qualified in linears and is_gelu:
                fused[qualified] = next_name
    return fused


def _keep_off_the_fast_path(module: nn.Module, args) -> None:
    """A no-op forward pre-hook: nn.TransformerEncoderLayer skips its fused fast path (which
    reads its linears' float weights directly) whenever one is attached."""


def _has_fast_path_guard(module: nn.Module) -> bool:
    return any(hook is _keep_off_the_fast_path for hook in module._forward_pre_hooks.values())


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable) -> dict[str, Tensor]:
    """Runs `model` on each batch (a tensor, or a tuple of positional arguments) and returns, for
    every ``nn.Linear`` it holds, the largest magnitude seen in each input feature: float32
    [in_features] by qualified name, the `input_absmax` of `quantize_`.

    >>> import torch
    >>> from fastopt.nn import calibrate
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> calibrate(model, [torch.tensor([[1.0, -5.0, 2.0]]), torch.tensor([[-3.0, 1.0, 0.5]])])
    {'0': tensor([3., 5., 2.])}
    """
    stats: dict[str, Tensor] = {}

    def record(name):
        def hook(module, args):
            x = args[0].detach()
            absmax = x.abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            stats[name] = torch.maximum(stats[name], absmax) if name in stats else absmax

        return hook

    handles = [
        module.register_forward_pre_hook(record(name))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    try:
        for batch in batches:
            model(*batch) if isinstance(batch, tuple | list) else model(batch)
    finally:
        for handle in handles:
            handle.remove()
    return stats
