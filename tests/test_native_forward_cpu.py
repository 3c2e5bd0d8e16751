"""The one-call native forward's gatekeeping on CPU: it never serves a CPU, grad-mode, planned or
switched-off call, and it says why (the GPU tests check the calls it does serve)."""
import pytest
import torch

import adaptmoe as am
from adaptmoe import native_forward


def make_layer(**gate):
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=16, num_experts=4, gate=am.GateConfig(top_k=2, **gate),
                       experts=am.ExpertConfig(hidden_size=32))
    return am.MoELayer(cfg).eval()


def test_reasons_name_what_blocks_the_native_call():
    layer = make_layer()
    x = torch.randn(5, 16)
    assert "gradients" in layer.native_forward_blocker(x)
    with torch.no_grad():
        assert layer.native_forward_blocker(x) == "not a CUDA tensor"
        native_forward.set_enabled(False)
        try:
            assert "set_enabled(False)" in layer.native_forward_blocker(x)
        finally:
            native_forward.set_enabled(True)


def test_blocker_validates_knobs_like_forward():
    layer = make_layer()
    with torch.no_grad(), pytest.raises(ValueError, match="top_k"):
        layer.native_forward_blocker(torch.randn(5, 16), top_k=9)
    with pytest.raises(ValueError, match="model_dim"):
        layer.native_forward_blocker(torch.randn(5, 15))

