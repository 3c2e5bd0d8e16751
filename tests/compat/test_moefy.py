"""moefy: upcycled twins compute what the dense model did; selection; HF models from tiny configs train."""
import copy

import pytest
import torch
from torch import nn

import adaptmoe as am
from adaptmoe.moefy import MoEBlock, aux_loss, find_blocks, moefy

D = 12


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, 20, bias=bias), nn.GELU(), nn.Linear(20, D, bias=bias)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.fc2(self.act(self.fc1(x))))


class Residual(nn.Module):
    """Looks like an MLP by its children but adds the input: the probe must reject it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, 20), nn.ReLU(), nn.Linear(20, D)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, D)
        self.mlp = MLP()
        self.norm = nn.LayerNorm(D)
        self.seq = nn.Sequential(nn.Linear(D, 16), nn.SiLU(), nn.Linear(16, 7))   # output dim 7 != D
        self.res = Residual()

    def forward(self, x):
        h = self.norm(self.mlp(self.inp(x)))
        return self.seq(self.res(h))


def outputs_and_input_grad(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y, x.grad


@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 2), (3, 3)])
def test_upcycled_twin_equals_dense(num_experts, top_k):
    """k=1 over one expert, or any k with renormalised weights: every expert is the dense MLP."""
    torch.manual_seed(0)
    dense = Net().eval()
    twin = moefy(copy.deepcopy(dense), num_experts=num_experts, top_k=top_k).eval()
    assert isinstance(twin.mlp, MoEBlock) and isinstance(twin.seq, MoEBlock) and isinstance(twin.res, Residual)
    x = torch.randn(6, 4, 5)
    y0, g0 = outputs_and_input_grad(dense, x)
    y1, g1 = outputs_and_input_grad(twin, x)
    torch.testing.assert_close(y1, y0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-6)


def test_selection_by_pattern_and_predicate():
    model = Net()
    assert [name for name, _ in find_blocks(model)] == ["mlp", "seq"]
    twin = moefy(copy.deepcopy(model), num_experts=2, name_pattern=r"^seq$")
    assert isinstance(twin.seq, MoEBlock) and isinstance(twin.mlp, MLP)
    twin = moefy(copy.deepcopy(model), num_experts=2, predicate=lambda name, m: isinstance(m, MLP))
    assert isinstance(twin.mlp, MoEBlock) and isinstance(twin.seq, nn.Sequential)
    with pytest.raises(ValueError, match="predicate/name_pattern selected 'res'"):
        moefy(copy.deepcopy(model), num_experts=2, name_pattern="res")
    assert isinstance(twin.mlp.dropout[0], nn.Dropout)   # the block's dropout is kept, after the experts


def test_root_block_and_no_upcycle():
    torch.manual_seed(1)
    dense = nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, D))
    block = moefy(dense, num_experts=2, upcycle=False, gate=am.GateConfig(kind="sigmoid", top_k=1))
    assert isinstance(block, MoEBlock) and block.moe.config.gates[0].kind == "sigmoid"
    assert not torch.equal(block.moe.experts.batched_fc1_w[0], dense[0].weight)
    assert block.moe.config.gates[0].capacity_factor == 1.0   # a GateConfig is kept unless overridden


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(num_experts=0), ValueError, "num_experts"),
    (dict(num_experts=2, top_k=3), ValueError, "top_k"),
    (dict(num_experts=2, gate="softmaxx"), ValueError, "gate kind"),
    (dict(num_experts=2, gate=3), TypeError, "gate"),
    (dict(num_experts=2, predicate="mlp"), TypeError, "predicate"),
    (dict(num_experts=2, name_pattern="nothing-matches"), ValueError, "no MLP block"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        moefy(Net(), **kwargs)
    with pytest.raises(TypeError, match="model"):
        moefy("not a model", num_experts=2)


def test_moefied_block_checks_input_dims():
    block = moefy(nn.Sequential(nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, D)), num_experts=2)
    with pytest.raises(ValueError, match="model_dim"):
        block(torch.randn(3, D + 1))


transformers = pytest.importorskip("transformers", reason="transformers is not installed; HF moefy tests skipped")


def tiny_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def tiny_llama():
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(config)


@pytest.mark.parametrize("build,kind", [(tiny_gpt2, "ffn"), (tiny_llama, "gated_ffn")])
def test_hf_model_upcycled_twin_equals_dense(build, kind):
    torch.manual_seed(2)
    dense = build().eval()
    twin = moefy(copy.deepcopy(dense), num_experts=4, top_k=2).eval()
    layers = [m for m in twin.modules() if isinstance(m, am.MoELayer)]
    assert len(layers) == 2 and all(layer.config.experts.kind == kind for layer in layers)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(twin(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_hf_model_moefied_trains(build):
    torch.manual_seed(3)
    model = moefy(build(), num_experts=4, top_k=1, gate=am.GateConfig(kind="softmax", top_k=1, capacity_factor=1.25))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 64, (4, 12))
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss + 0.01 * aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any("gates" in n for n in changed) and any("experts" in n for n in changed)
