"""Edge cases found in review: odd model/hidden dims on the CPU decode path, zero-token HF calls."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer
from adaptmoe.integrations import replace_moe_blocks
from adaptmoe.serving import ServingMoE
from reference import reference_forward


@pytest.mark.parametrize("D, H", [(5, 7), (16, 7), (5, 8), (6, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_on_cpu_with_unaligned_dims_matches_reference(D, H, dtype):
    """torch._grouped_mm needs 16-byte row strides; odd D or H must take another decode method."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(model_dim=D, num_experts=4, gate=GateConfig(top_k=2),
                               experts=ExpertConfig(kind="gated_ffn", hidden_size=H, activation="silu")))
    layer = layer.to(dtype).eval()
    x = torch.randn(3, D, dtype=dtype)
    expected = reference_forward(layer, x, capacity_factor=0.0)
    for kernel in ("auto", "decode"):
        with torch.no_grad():
            y = ServingMoE(layer, kernel=kernel)(x)
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol, msg=kernel)


class _Block(nn.Module):
    """transformers 4.x Mixtral-style sparse block: (hidden, router_logits)."""

    def __init__(self, D=8, H=8, E=4):
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(_Expert(D, H) for _ in range(E))


class _Expert(nn.Module):
    def __init__(self, D, H):
        super().__init__()
        self.w1, self.w3, self.w2 = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False), nn.Linear(H, D, bias=False)
        self.act_fn = nn.SiLU()


def test_hf_block_zero_tokens_returns_its_own_router_logits():
    model = nn.Sequential(_Block())
    assert replace_moe_blocks(model) == 1
    model.eval()
    with torch.no_grad():
        _, logits = model(torch.randn(1, 5, 8))
        assert logits.shape == (5, 4)
        y, logits = model(torch.randn(1, 0, 8))
    assert y.shape == (1, 0, 8)
    assert logits.shape == (0, 4), "stale router logits of the previous call"


def test_train_mode_no_grad_call_uses_the_layers_training_routing():
    import torch
    from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer
    from adaptmoe.serving import ServingMoE
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(model_dim=16, num_experts=4, gate=GateConfig(top_k=2, noise_std=50.0),
                               experts=ExpertConfig(hidden_size=16))).train()
    serving = ServingMoE(layer, kernel="auto")
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.manual_seed(1)
        served = serving(x)
        torch.manual_seed(1)
        direct = layer(x, capacity_factor=0.0)
    torch.testing.assert_close(served, direct)


def test_prepare_plans_with_the_top_k_of_the_chosen_gate():
    import torch
    from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer
    from adaptmoe.serving import ServingMoE
    layer = MoELayer(MoEConfig(model_dim=16, num_experts=4, gate=GateConfig(top_k=1),
                               extra_gates=(GateConfig(top_k=3),), experts=ExpertConfig(hidden_size=16))).eval()
    serving = ServingMoE(layer)
    serving.prepare(8, gate_index=1)
    before = serving.planner.plans_computed
    with torch.no_grad():
        serving(torch.randn(8, 16), gate_index=1)
    assert serving.planner.plans_computed == before      # the call's bucket was planned for k=3
