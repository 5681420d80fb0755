"""fastopt: fused kernels for PyTorch's optimizer step and linear layers, on CPU and CUDA.

Drop-in optimizers (`FusedAdam`, `FusedAdamW`, `FusedRMSprop`, `FusedAdagrad`,
`FusedAdadelta`), drop-in layers (`fastopt.nn.Int8Linear`, `fastopt.nn.BlockSparseLinear`, and
`quantize_` / `sparsify_` to convert a whole model). Ops live under ``torch.ops.fastopt``;
``fastopt.functional`` wraps them with docstrings. ``python -m fastopt --help`` lists the
commands (info, selftest, bench, plot, demo).

>>> import torch, fastopt
>>> model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
>>> opt = fastopt.FusedAdamW(model.parameters(), lr=1e-3)  # was torch.optim.AdamW
>>> model(torch.randn(8, 64)).square().mean().backward()
>>> _ = opt.step()
>>> served = fastopt.nn.quantize_(model, mode="dynamic")  # every nn.Linear -> Int8Linear
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
