"""Replacing Mixtral / Qwen2-MoE sparse blocks keeps the outputs (tiny random models, no download).

Two sources of blocks: the installed transformers (5.x fused layout; skipped when not installed)
and a minimal local re-implementation of the transformers 4.x structure (router Linear, ModuleList
experts with w1/w2/w3 or gate_proj/up_proj/down_proj, Qwen's shared expert), which always runs.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adaptmoe.integrations import AdaptMoEBlock, replace_moe_blocks

D, H, E = 32, 24, 6


# -- transformers 4.x structure, re-implemented ----------------------------------------------
class MixtralExpertV4(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(D, H, bias=False), nn.Linear(D, H, bias=False)
        self.w2 = nn.Linear(H, D, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.w2(self.act_fn(self.w1(x)) * self.w3(x))


class QwenMLPV4(nn.Module):
    def __init__(self, hidden=H):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(D, hidden, bias=False), nn.Linear(D, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, D, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SparseBlockV4(nn.Module):
    """Softmax (fp32) top-k, renormalised for Mixtral or when norm_topk_prob; returns (y, logits)."""

    def __init__(self, qwen: bool, norm_topk_prob: bool = True, top_k: int = 2):
        super().__init__()
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(QwenMLPV4() if qwen else MixtralExpertV4() for _ in range(E))
        if qwen:
            self.shared_expert = QwenMLPV4(hidden=40)
            self.shared_expert_gate = nn.Linear(D, 1, bias=False)

    def forward(self, hidden_states):
        b, s, d = hidden_states.shape
        x = hidden_states.view(-1, d)
        router_logits = self.gate(x)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(self.top_k):
                out[t] += weights[t, j] * self.experts[int(selected[t, j])](x[t:t + 1])[0]
        if hasattr(self, "shared_expert"):
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out.view(b, s, d), router_logits


def randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


@pytest.mark.parametrize("qwen, norm", [(False, True), (True, False), (True, True)])
def test_v4_structure_block_replacement(qwen, norm):
    torch.manual_seed(0)
    block = randomize(SparseBlockV4(qwen, norm)).double().eval()
    model = nn.Sequential(copy.deepcopy(block))
    assert replace_moe_blocks(model) == 1 and isinstance(model[0], AdaptMoEBlock)
    assert replace_moe_blocks(model) == 0                       # already replaced
    for shape in ((1, 1, D), (2, 5, D), (1, 70, D)):
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            y_ref, logits_ref = block(x)
            y, logits = model[0](x)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(logits, logits_ref)


def test_v4_structure_training_forward_and_grads():
    torch.manual_seed(0)
    block = randomize(SparseBlockV4(qwen=False)).double().train()
    model = nn.Sequential(copy.deepcopy(block))
    replace_moe_blocks(model)
    assert model[0].training
    x = torch.randn(2, 3, D, dtype=torch.float64)
    y_ref, _ = block(x)
    y, _ = model[0](x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    y.sum().backward()
    assert model[0].gate.weight.grad is not None
    assert model[0].moe.layer.experts.batched_fc1_w.grad is not None


# -- the installed transformers ---------------------------------------------------------------
def _tiny_configs():
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=64, max_position_embeddings=64)
    mixtral = transformers.MixtralConfig(intermediate_size=H, num_local_experts=E, num_experts_per_tok=2, **common)
    qwen = transformers.Qwen2MoeConfig(intermediate_size=48, moe_intermediate_size=H,
                                       shared_expert_intermediate_size=40, num_experts=E, num_experts_per_tok=2,
                                       norm_topk_prob=False, **common)
    for config in (mixtral, qwen):
        config._experts_implementation = "eager"    # HF's grouped_mm experts refuse float64
    return transformers, {"mixtral": mixtral, "qwen2_moe": qwen}


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_transformers_block_replacement(arch):
    transformers, configs = _tiny_configs()
    modeling = {"mixtral": transformers.models.mixtral.modeling_mixtral,
                "qwen2_moe": transformers.models.qwen2_moe.modeling_qwen2_moe}[arch]
    cls = modeling.MixtralSparseMoeBlock if arch == "mixtral" else modeling.Qwen2MoeSparseMoeBlock
    torch.manual_seed(0)
    block = randomize(cls(configs[arch])).double().eval()
    model = nn.Sequential(copy.deepcopy(block))
    assert replace_moe_blocks(model) == 1
    for shape in ((1, 1, D), (3, 7, D), (1, 80, D)):
        x = torch.randn(*shape, dtype=torch.float64)
        with torch.no_grad():
            expected, got = block(x), model[0](x)
        assert type(got) is type(expected)           # 5.x blocks return the hidden states only
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_transformers_model_replacement_keeps_logits_and_router_logits(arch):
    transformers, configs = _tiny_configs()
    cls = transformers.MixtralForCausalLM if arch == "mixtral" else transformers.Qwen2MoeForCausalLM
    torch.manual_seed(0)
    model = cls(configs[arch])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".mlp." in name:
                p.normal_(0, 0.3)
    model = model.double().eval()
    swapped = copy.deepcopy(model)
    assert replace_moe_blocks(swapped) == 2
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        expected = model(ids, output_router_logits=True)
        got = swapped(ids, output_router_logits=True)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-9, atol=1e-9)
    assert len(got.router_logits) == len(expected.router_logits) == 2
    for a, b in zip(got.router_logits, expected.router_logits):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.aux_loss, expected.aux_loss)
