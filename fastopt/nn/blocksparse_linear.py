"""``BlockSparseLinear``: an ``nn.Linear`` whose weight keeps only some B x B blocks, and
``sparsify_``, which swaps the linear layers of a model for it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..functional.blocksparse import BlockSparseIndex, blocksparse_linear, index_from_mask
from . import blocksparse_layout as layouts

_INDEX_NAMES = BlockSparseIndex._fields


class BlockSparseLinear(nn.Module):
    """``y = x W^T + b`` with a block-sparse W: only the blocks of a block layout are stored and
    trained.

    The layout is a boolean mask [out_features / B, in_features / B], given as ``layout`` or
    drawn at random with ``density`` (the fraction of blocks kept; with ``balanced=True``,
    the same number in every block row). The stored blocks are the parameter ``values``
    [nnz, B, B] (row-major order of the mask); the mask is the buffer ``layout``. The
    ``state_dict`` holds these plain tensors (and ``bias``) only; the kernels' index tensors are
    rebuilt from the mask, also when a ``state_dict`` with another layout is loaded (which
    resizes ``values``: build optimizers after loading).

    Inputs are [..., in_features]. CPU: float32, bfloat16 and float64, block sizes 16, 32, 64;
    CUDA (Triton): float16, bfloat16, float32, block sizes 16 to 128.

    >>> import torch, fastopt
    >>> from fastopt.nn import BlockSparseLinear
    >>> layer = BlockSparseLinear(256, 128, block_size=32, density=0.25)  # a random layout
    >>> layer.values.shape  # 8 of the 4 x 8 blocks of 32 x 32
    torch.Size([8, 32, 32])
    >>> layer(torch.randn(4, 256)).shape
    torch.Size([4, 128])
    >>> linear = torch.nn.Linear(256, 128)
    >>> sparse = BlockSparseLinear.from_dense(linear, block_size=32, density=0.5)  # top blocks
    >>> sparse
    BlockSparseLinear(in_features=256, out_features=128, bias=True, block_size=32, density=0.5)
    >>> opt = fastopt.FusedAdamW(sparse.parameters(), lr=1e-3)  # trains the stored blocks
    >>> dense_again = sparse.to_dense()  # an nn.Linear, zeros outside the blocks
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: int = 32,
        density: float | None = None,
        layout: Tensor | None = None,
        balanced: bool = False,
        generator: torch.Generator | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        shape = layouts.check_block_shape(out_features, in_features, block_size)
        if (density is None) == (layout is None):
            raise ValueError("give exactly one of density (a random layout) and layout (a mask)")
        if layout is None:
            layout = layouts.random_mask(shape, density, balanced=balanced, generator=generator)
        elif tuple(layout.shape) != shape:
            raise ValueError(
                f"layout must be a mask of shape (out_features / block_size, in_features / "
                f"block_size) = {shape}, got {tuple(layout.shape)}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        kwargs = {"device": device, "dtype": dtype}
        self.register_buffer("layout", layout.to(device=device, dtype=torch.bool, copy=True))
        nnz = int(self.layout.sum())
        self.values = nn.Parameter(torch.empty((nnz, block_size, block_size), **kwargs))
        self.bias = nn.Parameter(torch.empty(out_features, **kwargs)) if bias else None
        self._set_index()
        self.reset_parameters()

    def _set_index(self) -> None:
        """Rebuilds the kernels' index tensors (non-persistent buffers) from `layout`."""
        for name, tensor in zip(_INDEX_NAMES, index_from_mask(self.layout), strict=True):
            self.register_buffer(name, tensor, persistent=False)

    def reset_parameters(self) -> None:
        """nn.Linear's initialization: uniform in +-1/sqrt(in_features)."""
        bound = layouts.init_bound(self.in_features)
        nn.init.uniform_(self.values, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def index(self) -> BlockSparseIndex:
        """The index tensors of the layout, as the kernels take them."""
        return BlockSparseIndex(*(getattr(self, name) for name in _INDEX_NAMES))

    @property
    def density(self) -> float:
        """The fraction of blocks stored."""
        return self.values.shape[0] / max(1, self.layout.numel())

    def forward(self, input: Tensor) -> Tensor:
        return blocksparse_linear(input, self.values, self.index, self.bias)

    def dense_weight(self) -> Tensor:
        """W [out_features, in_features]: the stored blocks, zeros elsewhere (differentiable)."""
        return layouts.dense_from_blocks(self.values, self.layout)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        block_size: int = 32,
        density: float | None = None,
        *,
        layout: Tensor | None = None,
        norm: str = "l2",
        balanced: bool = False,
    ) -> BlockSparseLinear:
        """The block-sparse layer keeping the blocks of ``linear.weight`` with the largest ``norm``
        ("l2" or "l1"): a fraction ``density`` of them (of each block row when ``balanced``), or
        those of an explicit ``layout``. Same dtype and device as ``linear``.

        >>> import torch
        >>> from fastopt.nn import BlockSparseLinear
        >>> linear = torch.nn.Linear(64, 64)
        >>> BlockSparseLinear.from_dense(linear, 16, 0.25, norm="l1", balanced=True).layout.sum(1)
        tensor([1, 1, 1, 1])
        """
        weight = linear.weight
        out_features, in_features = weight.shape
        if layout is None:
            if density is None:
                raise ValueError("give density (magnitude pruning) or layout (a mask)")
            layout = layouts.magnitude_mask(
                weight, block_size, density, norm=norm, balanced=balanced
            )
        layer = cls(
            in_features,
            out_features,
            linear.bias is not None,
            block_size=block_size,
            layout=layout,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            layer.values.copy_(layouts.blocks_from_dense(weight, layer.layout))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` computing the same function (zeros outside the stored blocks)."""
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.dense_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, block_size={self.block_size}, "
            f"density={self.density:.4g}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs
    ) -> None:
        # All or nothing: a checkpoint of another block grid, or whose values do not match its
        # layout, loads nothing (not even the bias). One of another layout on the same grid
        # brings its mask, and `values` is resized to its block count.
        layout = state_dict.get(prefix + "layout")
        values = state_dict.get(prefix + "values")
        if layout is not None:
            expected = (int(layout.sum()), self.block_size, self.block_size)
            if layout.shape != self.layout.shape:
                error_msgs.append(
                    f"size mismatch for {prefix}layout: a block grid of {tuple(layout.shape)} "
                    f"cannot load into this layer's {tuple(self.layout.shape)} (features or "
                    "block_size differ)"
                )
                return
            if values is not None and tuple(values.shape) != expected:
                error_msgs.append(
                    f"size mismatch for {prefix}values: {tuple(values.shape)} does not match the "
                    f"checkpoint's layout, which holds {expected}"
                )
                return
            layout = layout.to(device=self.layout.device, dtype=torch.bool)
            if not torch.equal(layout, self.layout):
                if values is None:
                    # Without the values of the new layout, `values` would be left uninitialized.
                    error_msgs.append(
                        f"missing {prefix}values: the checkpoint's {prefix}layout differs from "
                        "this layer's, and its blocks cannot be loaded without the values; "
                        f"include {prefix}values in the state_dict"
                    )
                    return
                self.layout = layout.clone()
                self._set_index()
                self.values.data = self.values.new_empty(expected)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs
        )


def sparsify_(
    model: nn.Module,
    block_size: int = 32,
    density: float = 0.25,
    *,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    norm: str = "l2",
    balanced: bool = False,
) -> nn.Module:
    """Replaces, in place, every ``nn.Linear`` of ``model`` for which ``filter_fn(module,
    qualified_name)`` is true (default: all; torchao's convention, as `quantize_`'s) by
    ``BlockSparseLinear.from_dense(...)`` with these arguments. Returns ``model``. A selected
    layer whose dimensions ``block_size`` does not divide raises a ValueError naming it, before
    anything is replaced.

    >>> import torch
    >>> from fastopt.nn import sparsify_
    >>> model = torch.nn.Sequential(
    ...     torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)
    ... )
    >>> _ = sparsify_(model, 32, 0.25, filter_fn=lambda module, name: name != "2")
    >>> [type(layer).__name__ for layer in model]
    ['BlockSparseLinear', 'ReLU', 'Linear']
    """
    layouts.blocks_per_row(density, (1, 1), balanced)  # a bad density fails before any change
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if name  # the model itself cannot be replaced in place
        and type(module) is nn.Linear
        and (filter_fn is None or filter_fn(module, name))
    ]
    for name, module in chosen:
        try:
            layouts.check_block_shape(module.out_features, module.in_features, block_size)
        except ValueError as error:
            raise ValueError(f"{name}: {error}, or leave it out with filter_fn") from error
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        sparse = BlockSparseLinear.from_dense(
            module, block_size, density, norm=norm, balanced=balanced
        )
        setattr(parent, child, sparse)
    return model
