"""Drop-in replacements for ``nn.Linear``: block-sparse and int8 layers, and helpers that swap
the layers of a whole model."""

from .blocksparse_linear import BlockSparseLinear, sparsify_
from .int8_linear import Int8Linear, calibrate, quantize_
from .int8_shared_input import Int8LinearGroup, Int8LinearPart

__all__ = [
    "BlockSparseLinear",
    "Int8Linear",
    "Int8LinearGroup",
    "Int8LinearPart",
    "calibrate",
    "quantize_",
    "sparsify_",
]
