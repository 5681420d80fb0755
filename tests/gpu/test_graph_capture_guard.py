"""A multi-group step creates a set found_inf flag per device on its first step (it runs the
later groups' checks as a skipped step); created under a CUDA graph capture, its fill would only
be recorded, so that first step is refused while capturing."""

from __future__ import annotations

import pytest
import torch

import fastopt


def test_a_first_multi_group_step_under_graph_capture_is_refused(monkeypatch):
    """The flag that skips the checking pass of later groups is created on the first such step;
    under a CUDA graph capture its fill would only be recorded, so that step is refused before
    anything is created."""
    opt = fastopt.FusedAdam([torch.zeros(3, requires_grad=True)], lr=0.1)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="take one step before capturing"):
        opt._skip_flag(torch.device("cuda"))
    assert not getattr(opt, "_skip_flags", {})
    assert opt._skip_flag(torch.device("cpu")).item() == 1.0  # CPU steps are never captured
