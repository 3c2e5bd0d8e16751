"""Edge cases found in review of the compat surfaces."""
from __future__ import annotations

from torch import nn

from adaptmoe.compat.fastmoe import fmoefy


def test_fmoefy_top_k_applies_with_a_gate_kind():
    model = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)))
    model = fmoefy(model, num_experts=4, top_k=2, gate="softmax")
    assert model[1].moe.config.gate.top_k == 2


def test_fmoefy_with_a_gate_class_says_what_it_takes():
    import pytest
    import torch.nn as nn
    from adaptmoe.compat.fastmoe import NaiveGate, fmoefy
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    with pytest.raises(TypeError, match="gate must be a gate kind name"):
        fmoefy(model, num_experts=2, gate=NaiveGate)
