"""How close fastopt must come to torch: fp32 / fp64 tolerances and the spacing of a dtype."""

from __future__ import annotations

import torch
from torch import Tensor

# rtol, atol of the fp32 / fp64 comparisons with torch.optim.*(foreach=False).
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-12, 1e-12),
}

# The fp32 tolerances as keyword arguments, for the tests that compare fp32 runs only.
FP32 = dict(zip(("rtol", "atol"), TOLERANCES[torch.float32], strict=True))


def ulp(t: Tensor) -> Tensor:
    """The spacing of `t`'s dtype at each of its values, in float32."""
    up = torch.nextafter(t.abs(), torch.full_like(t, float("inf")))
    return up.float() - t.abs().float()
