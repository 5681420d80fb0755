"""torch.optim-compatible optimizers whose step is one fused kernel."""

from ._precision import to_torch_state_dict
from .adadelta import FusedAdadelta
from .adagrad import FusedAdagrad
from .adam import FusedAdam, FusedAdamW
from .rmsprop import FusedRMSprop

__all__ = [
    "FusedAdadelta",
    "FusedAdagrad",
    "FusedAdam",
    "FusedAdamW",
    "FusedRMSprop",
    "to_torch_state_dict",
]
