"""FastMoE surface: README usage, parity with the typed layer and a per-token reference, bad input."""
import pytest
import torch
from torch import nn

import adaptmoe as am
from adaptmoe.compat import fastmoe
from adaptmoe.compat.fastmoe import (FMoE, FMoETransformerMLP, GShardGate, NaiveGate, NoisyGate, SwitchGate,
                                     fmoefy)
from compat_helpers import assert_same, same
from reference import reference_forward

D, H, E = 16, 24, 4


class MLP(nn.Module):
    def __init__(self, d_model):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(d_model, H), nn.GELU(), nn.Linear(H, d_model)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CountingExpert(nn.Module):
    """A FastMoE-style expert taking (x, fwd_expert_count) and not an MLP: runs per expert."""

    def __init__(self, d_model):
        super().__init__()
        self.lin = nn.Linear(d_model, d_model)

    def forward(self, x, fwd_expert_count):
        return torch.tanh(self.lin(x)) * 2


def typed_twin(fm, kind="softmax", k=2, losses=("none",), **gate_kw):
    """The typed layer FMoE(gate_bias=False) should equal, with fm's parameters copied in."""
    gate = am.GateConfig(kind=kind, top_k=k, capacity_factor=0.0, losses=losses, **gate_kw)
    layer = am.MoELayer(am.MoEConfig(model_dim=D, num_experts=E, gate=gate, experts=fm.layer.config.experts))
    with torch.no_grad():
        layer.gates[0].wg.weight.copy_(fm.gate.gate.weight)
        for (name, p), q in zip(fm.layer.experts.named_parameters(), layer.experts.parameters()):
            q.copy_(p)
    pairs = [("gate", fm.gate.gate.weight, layer.gates[0].wg.weight, same)]
    pairs += [(n, p, q, same) for (n, p), q in zip(fm.layer.experts.named_parameters(), layer.experts.parameters())]
    return layer, pairs


def test_readme_fmoefy_on_a_plain_model():
    model = nn.Sequential(nn.Linear(8, D), nn.Sequential(nn.Linear(D, 32), nn.GELU(), nn.Linear(32, D)),
                          nn.Linear(D, 3))
    model = fmoefy(model, num_experts=E)          # was: from fmoe.megatron import fmoefy
    assert isinstance(model[1].moe, am.MoELayer) and model[1].moe.num_global_experts == E
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(torch.randn(10, 8)).pow(2).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_readme_replace_the_mlp_by_fmoe_layers():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(D)
            self.mlp = FMoETransformerMLP(num_expert=E, d_model=D, d_hidden=H, top_k=2, gate=GShardGate)

        def forward(self, x):
            return x + self.mlp(self.ln(x))

    block = Block()
    y = block(torch.randn(2, 5, D))
    loss = y.pow(2).mean() + 0.01 * block.mlp.gate.get_loss()
    loss.backward()
    assert y.shape == (2, 5, D) and block.mlp.gate.gate.weight.grad is not None


def test_transformer_mlp_matches_typed_layer_and_reference():
    torch.manual_seed(0)
    fm = FMoETransformerMLP(num_expert=E, d_model=D, d_hidden=H, gate=NaiveGate, top_k=2, gate_bias=False)
    layer, pairs = typed_twin(fm)
    x = torch.randn(3, 7, D)
    assert_same(fm, layer, x, pairs)
    fm64 = fm.double()
    torch.testing.assert_close(fm64(x.double()), reference_forward(fm64.layer, x.double()).reshape(3, 7, D))


@pytest.mark.parametrize("gate_cls,k,cf_train,cf_eval", [(GShardGate, 2, 1.2, 2.4), (SwitchGate, 1, 1.2, 2.4)])
def test_capacity_gates_match_typed_layer(gate_cls, k, cf_train, cf_eval):
    torch.manual_seed(1)
    fm = FMoETransformerMLP(num_expert=E, d_model=D, d_hidden=H, gate=gate_cls, top_k=k, gate_bias=False)
    layer, pairs = typed_twin(fm, k=k, losses=("gshard",), fp32=True)
    x = torch.randn(40, D)
    fm.eval()   # no jitter: both sides deterministic
    layer.eval()
    assert_same(fm, layer, x, pairs, call_b=lambda m, x: m(x, capacity_factor=cf_eval))
    torch.testing.assert_close(fm.get_loss(), layer.l_aux)
    if gate_cls is GShardGate:
        fm.train()
        layer.train()
        assert_same(fm, layer, x, pairs, call_b=lambda m, x: m(x, capacity_factor=cf_train))
        assert fm.layer.last_routing.capacity == layer.last_routing.capacity


def brute_force(fm, instances, x, k):
    """Per token: softmax over the k largest biased logits, sum of weight x expert(x)."""
    logits = fm.gate.gate(x)
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        vals, idx = torch.topk(logits[t], k)
        w = torch.softmax(vals, 0)
        for j in range(k):
            expert = instances[int(idx[j])]
            args = (x[t:t + 1], torch.tensor([1])) if isinstance(expert, CountingExpert) else (x[t:t + 1],)
            out[t] = out[t] + w[j] * expert(*args)[0]
    return out


@pytest.mark.parametrize("expert_cls", [MLP, CountingExpert])
def test_expert_classes_match_brute_force(expert_cls):
    torch.manual_seed(2)
    fm = FMoE(num_expert=E, d_model=D, top_k=2, expert=expert_cls)   # gate_bias=True by default
    torch.manual_seed(2)
    instances = [expert_cls(D) for _ in range(E)]
    expected_kind = "ffn" if expert_cls is MLP else "custom"
    assert fm.layer.config.experts.kind == expected_kind
    x = torch.randn(9, D)
    torch.testing.assert_close(fm(x), brute_force(fm, instances, x, 2), rtol=1e-5, atol=1e-6)


def test_balance_loss_reachable_from_layer_and_gate():
    fm = FMoETransformerMLP(num_expert=E, d_model=D, d_hidden=H, gate="noisy", top_k=2)
    fm(torch.randn(12, D)).sum().backward()
    assert isinstance(fm.gate, NoisyGate)
    assert fm.l_aux is not None and fm.layer.losses.keys() == {"load_importance"}
    torch.testing.assert_close(fm.get_loss(clear=False), fm.l_aux)
    assert fm.gate.get_loss() is fm.l_aux and not fm.gate.has_loss


def test_gate_hook_and_per_call_knobs():
    seen = []
    fm = FMoETransformerMLP(num_expert=E, d_model=D, d_hidden=H, top_k=2,
                            gate_hook=lambda idx, score, _: seen.append((idx.shape, score.shape)))
    fm(torch.randn(6, D), top_k=1)
    assert seen == [(torch.Size([6, 1]), torch.Size([6, 1]))]


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(top_k=5), ValueError, "top_k"),
    (dict(gate="softmaxish"), ValueError, "gate"),
    (dict(gate=SwitchGate, top_k=2), ValueError, "top_k"),
    (dict(world_size=2), ValueError, "world_size"),
    (dict(d_hidden=0), ValueError, "d_hidden"),
    (dict(num_expert=0), ValueError, "num_expert"),
    (dict(mask=torch.zeros(3)), ValueError, "mask"),
    (dict(gate=nn.Linear), TypeError, "gate"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, word):
    args = dict(num_expert=E, d_model=D, d_hidden=H)
    with pytest.raises(exc, match=word):
        FMoETransformerMLP(**{**args, **kwargs})


def test_bad_inputs_name_the_problem():
    with pytest.raises(TypeError, match="expert"):
        FMoE(num_expert=E, d_model=D)
    fm = FMoETransformerMLP(num_expert=E, d_model=D, d_hidden=H)
    with pytest.raises(ValueError, match="model_dim"):
        fm.layer(torch.randn(4, D + 1))
    with pytest.raises(TypeError, match="moe_inp"):
        FMoE.forward(fm, [torch.randn(4, D)])
    with pytest.raises(ValueError, match="needs torch.distributed"):
        fastmoe.DistributedGroupedDataParallel(fm)
