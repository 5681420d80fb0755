"""fastopt's functional API: thin, documented wrappers over the `torch.ops.fastopt.*` ops.

Like `torch.nn.functional`, these hold no state: the optimizer classes in `fastopt.optim` and the
layers in `fastopt.nn` keep it and call them.
"""

from .optim import (
    adadelta_step_,
    adagrad_step_,
    adam_step_,
    rmsprop_step_,
    sparse_adagrad_step_,
)

__all__ = [
    "adadelta_step_",
    "adagrad_step_",
    "adam_step_",
    "rmsprop_step_",
    "sparse_adagrad_step_",
]
