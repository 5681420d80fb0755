"""Drop-in replacements for ``nn.Linear``: block-sparse and int8 layers, and helpers that swap
the layers of a whole model."""

from .blocksparse_linear import BlockSparseLinear, sparsify_
from .int8_linear import Int8Linear, calibrate, quantize_

__all__ = ["BlockSparseLinear", "Int8Linear", "calibrate", "quantize_", "sparsify_"]
