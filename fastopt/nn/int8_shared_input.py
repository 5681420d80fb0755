"""Linear layers that read one input (an attention block's query, key and value projections),
run as one `Int8Linear`: the input is quantized once, and one GEMM over the concatenated weights
replaces several smaller ones. `quantize_` builds these with ``fuse_shared_inputs=True``.

The model's ``forward`` still calls each layer on its own (``self.query(x)``, ``self.key(x)``,
...), so each layer is replaced by an `Int8LinearPart` of one `Int8LinearGroup`: the first part
called computes every part's output, and the others, called next with the very same input
tensor (unchanged since: same ``_version``; under ``torch.inference_mode`` tensors have no
version counter, and an input modified in place between the calls is not noticed), take theirs
from it. A part called with another input recomputes, so the outputs are those of the separate
int8 layers: per-row
activation scales and per-channel weight scales do not depend on which other channels share the
GEMM, so the concatenation gives the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .int8_linear import Int8Linear

# The sibling names `quantize_` groups: every name of a pattern must be an nn.Linear child of
# the same module, all with the same input features.
SHARED_INPUT_PATTERNS = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


@dataclass
class _Outputs:
    """The outputs of one fused call, kept until every part has taken its own."""

    input: Tensor
    version: int | None  # None for inference tensors, which have no version counter
    grad_enabled: bool
    parts: tuple[Tensor, ...]
    taken: set[int]


class Int8LinearGroup(nn.Module):
    """One `Int8Linear` (``fused``) over the weights of several layers that read the same input,
    concatenated along the output features, served to its `Int8LinearPart` modules.

    >>> import torch
    >>> from fastopt.nn import Int8LinearGroup
    >>> layers = [torch.nn.Linear(64, 32) for _ in range(3)]
    >>> group = Int8LinearGroup.from_float(layers)
    >>> query, key, value = group.parts()
    >>> x = torch.randn(5, 64)
    >>> q, k, v = query(x), key(x), value(x)  # one int8 GEMM
    >>> q.shape
    torch.Size([5, 32])
    """

    def __init__(self, fused: Int8Linear, out_features: list[int]) -> None:
        super().__init__()
        if sum(out_features) != fused.out_features:
            raise ValueError(
                f"out_features {out_features} must add up to the fused layer's {fused.out_features}"
            )
        self.fused = fused
        self.out_features = list(out_features)
        self._outputs: _Outputs | None = None

    @classmethod
    def from_float(cls, linears: list[nn.Linear], mode: str = "dynamic") -> Int8LinearGroup:
        """The group of the int8 twins of `linears` (nn.Linear layers of one input size, all with
        a bias or all without)."""
        first = linears[0]
        if any(type(layer) is not nn.Linear for layer in linears):
            raise TypeError("Int8LinearGroup.from_float takes nn.Linear layers")
        if not _same_input_and_bias(linears):
            raise ValueError(
                "Int8LinearGroup.from_float: the layers must have the same in_features, and a "
                "bias all or none of them"
            )
        weight = torch.cat([layer.weight.detach() for layer in linears])
        concatenated = nn.Linear(
            first.in_features,
            weight.shape[0],
            bias=first.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            concatenated.weight.copy_(weight)
            if first.bias is not None:
                concatenated.bias.copy_(torch.cat([layer.bias.detach() for layer in linears]))
        fused = Int8Linear.from_float(concatenated, mode=mode)
        return cls(fused, [layer.out_features for layer in linears])

    def parts(self) -> list[Int8LinearPart]:
        """One module per original layer, in order: call them as the layers were called."""
        return [Int8LinearPart(self, index) for index in range(len(self.out_features))]

    def output(self, input: Tensor, index: int) -> Tensor:
        """Part `index` of the fused layer's output for `input` (a view into the whole output,
        strided like ``torch.split``'s)."""
        if torch.compiler.is_compiling():  # traced: the compiler merges the identical calls
            return self.fused(input).split(self.out_features, dim=-1)[index]
        kept = self._outputs
        if (
            kept is not None
            and kept.input is input
            and kept.version == _version(input)
            and kept.grad_enabled == torch.is_grad_enabled()
            and index not in kept.taken
        ):
            kept.taken.add(index)
            if len(kept.taken) == len(self.out_features):
                self._outputs = None  # every part served: hold no tensors between calls
            return kept.parts[index]
        parts = self.fused(input).split(self.out_features, dim=-1)
        grad_enabled = torch.is_grad_enabled()
        self._outputs = _Outputs(input, _version(input), grad_enabled, parts, {index})
        return parts[index]

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}"


def _same_input_and_bias(linears: list[nn.Linear]) -> bool:
    """Whether `linears` take one input size and have a bias all or none of them: what one GEMM
    over their concatenated weights needs."""
    first = linears[0]
    return all(
        layer.in_features == first.in_features and (layer.bias is None) == (first.bias is None)
        for layer in linears
    )


def _version(t: Tensor) -> int | None:
    return None if t.is_inference() else t._version


class Int8LinearPart(nn.Module):
    """Stands for one layer of an `Int8LinearGroup`: ``part(x)`` is that layer's output. The
    group is held as a plain reference (the module that owns the parts registers the group
    itself), so its weights are saved once.

    >>> import torch
    >>> from fastopt.nn import Int8LinearGroup
    >>> group = Int8LinearGroup.from_float([torch.nn.Linear(16, 8), torch.nn.Linear(16, 4)])
    >>> key, value = group.parts()
    >>> value
    Int8LinearPart(in_features=16, out_features=4, part 1 of an Int8LinearGroup)
    >>> value(torch.randn(2, 16)).shape
    torch.Size([2, 4])
    """

    def __init__(self, group: Int8LinearGroup, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "group", group)  # not a submodule: see the class docstring
        self.index = index
        self.in_features = group.fused.in_features
        self.out_features = group.out_features[index]

    def forward(self, input: Tensor) -> Tensor:
        return self.group.output(input, self.index)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"part {self.index} of an Int8LinearGroup"
        )


def group_shared_inputs_(
    model: nn.Module, linears: dict[str, nn.Linear], mode: str, input_absmax: dict[str, Tensor]
) -> set[str]:
    """Replaces, in place, each set of `linears` (by qualified name) that matches one of the
    SHARED_INPUT_PATTERNS with the parts of one `Int8LinearGroup`; returns the names replaced."""
    grouped: set[str] = set()
    for parent_name, parent in list(model.named_modules()):
        prefix = f"{parent_name}." if parent_name else ""
        for names in SHARED_INPUT_PATTERNS:
            members = [linears.get(prefix + name) for name in names]
            group_name = "_".join(names)
            if any(layer is None for layer in members) or hasattr(parent, group_name):
                continue
            if any(prefix + name in input_absmax for name in names):
                continue  # SmoothQuant: each layer scales its input its own way
            first = members[0]
            if not _same_input_and_bias(members) or any(
                layer.weight.dtype != first.weight.dtype
                or layer.weight.device != first.weight.device
                for layer in members
            ):
                continue
            group = Int8LinearGroup.from_float(members, mode)
            parent.add_module(group_name, group)
            for name, part in zip(names, group.parts(), strict=True):
                setattr(parent, name, part)
                grouped.add(prefix + name)
    return grouped
