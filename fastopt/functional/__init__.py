"""fastopt's functional API: thin, documented wrappers over the `torch.ops.fastopt.*` ops.

Like `torch.nn.functional`, these hold no state: the optimizer classes in `fastopt.optim` and the
layers in `fastopt.nn` keep it and call them. `optim` holds the optimizer steps, `int8` and
`blocksparse` the layers' products (importing them registers the ops' autograd and their CUDA
kernels).
"""

from .blocksparse import BlockSparseIndex, blocksparse_linear, index_from_mask
from .int8 import (
    dequantize_weight,
    int8_linear,
    int8_mm,
    pack_int8_weight,
    quantize_per_channel,
    smoothing_scale,
    unpack_int8_weight,
    uses_weight_only_path,
)
from .optim import (
    adadelta_step_,
    adagrad_step_,
    adam_step_,
    rmsprop_step_,
    sparse_adagrad_step_,
)

__all__ = [
    "BlockSparseIndex",
    "adadelta_step_",
    "adagrad_step_",
    "adam_step_",
    "blocksparse_linear",
    "dequantize_weight",
    "index_from_mask",
    "int8_linear",
    "int8_mm",
    "pack_int8_weight",
    "quantize_per_channel",
    "rmsprop_step_",
    "smoothing_scale",
    "sparse_adagrad_step_",
    "unpack_int8_weight",
    "uses_weight_only_path",
]
