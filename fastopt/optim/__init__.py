"""torch.optim-compatible optimizers whose step is one fused kernel."""

from .adam import FusedAdam, FusedAdamW

__all__ = ["FusedAdam", "FusedAdamW"]
