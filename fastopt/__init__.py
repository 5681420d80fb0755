"""fastopt: fused kernels for PyTorch's optimizer step and linear layers, on CPU and CUDA.

    opt = fastopt.FusedAdam(model.parameters(), lr=1e-3)   # was torch.optim.Adam
    layer = fastopt.nn.Int8Linear.from_float(linear)        # was nn.Linear

Ops live under ``torch.ops.fastopt``; ``fastopt.functional`` wraps them with docstrings.
"""

# The ops must be defined before the kernels register for them.
from . import _extension, _library  # noqa: F401

_extension.load()

# functional registers the layers' autograd and CUDA (Triton) kernels when imported.
from . import functional, nn  # noqa: E402, F401
from .clip import clip_grad_norm_  # noqa: E402
from .optim import (  # noqa: E402
    FusedAdadelta,
    FusedAdagrad,
    FusedAdam,
    FusedAdamW,
    FusedRMSprop,
)

__version__ = "0.1.0"
__all__ = [
    "FusedAdadelta",
    "FusedAdagrad",
    "FusedAdam",
    "FusedAdamW",
    "FusedRMSprop",
    "clip_grad_norm_",
    "functional",
    "nn",
]
