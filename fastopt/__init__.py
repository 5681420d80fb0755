"""fastopt: fused kernels for PyTorch's optimizer step, on CPU and CUDA.

    opt = fastopt.FusedAdam(model.parameters(), lr=1e-3)   # was torch.optim.Adam

Ops live under ``torch.ops.fastopt``; ``fastopt.functional`` wraps them with docstrings.
"""

# The ops must be defined before the kernels register for them.
from . import _extension, _library  # noqa: F401

_extension.load()

from . import functional  # noqa: E402
from .optim import FusedAdam, FusedAdamW  # noqa: E402

__version__ = "0.1.0"
__all__ = ["FusedAdam", "FusedAdamW", "functional"]

# Block-sparse linear products: their autograd and CUDA (Triton) registrations.
from . import blocksparse  # noqa: E402, F401
