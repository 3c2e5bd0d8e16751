"""sigma-MoE surface: README usage, a float64 per-token reference of sigma-MoE's forward, parity
with the typed layer, torch.compile, its checkpoints, bad input."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import adaptmoe as am
from adaptmoe.compat.sigma_moe import MoE
from compat_helpers import assert_same, same

D, E, H, K = 12, 6, 8, 2


def sigma_reference(m, x, mode, after_topk):
    """sigma-MoE's forward in eval mode, per token, from its README and paper (keys/values/selector)."""
    keys, values, sel_w = m.keys.double(), m.values.double(), m.expert_sel.double()
    x_TD = x.double().reshape(-1, D)
    raw_TE = x_TD @ sel_w.t()
    p_E = torch.softmax(raw_TE, 1).mean(0)
    reg = (p_E * p_E.log()).sum()
    act = {"softmax": lambda v: torch.softmax(v, -1), "sigmoid": torch.sigmoid, "sinkmoid": torch.sigmoid}[mode]
    rows = []
    for t in range(x_TD.shape[0]):
        sel = raw_TE[t] if after_topk and mode != "sinkmoid" else act(raw_TE[t])
        idx = torch.topk(sel, K).indices
        w = act(raw_TE[t][idx]) if after_topk or mode == "sinkmoid" else sel[idx]
        acc = 0
        for j, e in enumerate(idx.tolist()):
            h = x_TD[t] @ keys[e]
            if m.bias is not None:
                h = h + m.bias[e].double()
            acc = acc + w[j] * (F.relu(h) @ values[e])
        rows.append(acc)
    out = torch.stack(rows)
    if m.o_bias is not None:
        out = out + m.o_bias.double()
    return out.reshape(*x.shape[:-1], -1), reg


def test_readme_example():
    torch.manual_seed(0)
    sigma_moe = MoE(D, E, H, K)          # was: from moe_layer import MoE ... .cuda()
    x = torch.randn(3, 5, D)
    out, loss = sigma_moe(x)
    (out.pow(2).mean() + 0.001 * loss).backward()
    assert out.shape == x.shape and loss.dim() == 0 and sigma_moe.expert_sel.grad is not None


@pytest.mark.parametrize("mode,after_topk,bias", list(itertools.product(["softmax", "sigmoid", "sinkmoid"],
                                                                         [False, True], [False, True])))
def test_matches_sigma_reference(mode, after_topk, bias):
    torch.manual_seed(1)
    m = MoE(D, E, H, K, selection_mode=mode, activation_after_topk=after_topk, bias=bias).double().eval()
    if bias:
        with torch.no_grad():
            m.bias.normal_()
            m.o_bias.normal_()
    x = torch.randn(4, 5, D, dtype=torch.float64)
    out, reg = m(x)
    ref_out, ref_reg = sigma_reference(m, x, mode, after_topk)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(reg.double(), ref_reg)


def test_v_dim_output():
    m = MoE(D, E, H, K, v_dim=5, bias=True).double().eval()
    x = torch.randn(7, D, dtype=torch.float64)
    out, _ = m(x)
    assert out.shape == (7, 5)
    torch.testing.assert_close(out, sigma_reference(m, x, "sigmoid", False)[0])


@pytest.mark.parametrize("mode", ["sigmoid", "sinkmoid"])
def test_matches_typed_layer_in_training(mode):
    torch.manual_seed(2)
    m = MoE(D, E, H, K, selection_mode=mode)
    gate = am.GateConfig(kind=mode, top_k=K, capacity_factor=0.0, normalize_topk=False, losses=("entropy",))
    typed = am.MoELayer(am.MoEConfig(model_dim=D, num_experts=E, gate=gate,
                                     experts=am.ExpertConfig(hidden_size=H, has_fc1_bias=False, has_fc2_bias=False)))
    typed.load_state_dict(m.layer.state_dict())
    pairs = [(n, p, q, same) for (n, p), q in zip(m.layer.named_parameters(), typed.parameters())]
    assert_same(m, typed, torch.randn(20, D), pairs, call_b=lambda layer, x: (layer(x), layer.losses["entropy"]))


def test_torch_compile_matches_eager():
    torch.manual_seed(3)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.moe, self.out = MoE(D, E, H, K, selection_mode="sinkmoid", bias=True), torch.nn.Linear(D, 3)

        def forward(self, x):
            y, reg = self.moe(x)
            return self.out(y).pow(2).mean() + 0.001 * reg

    net = Net()
    x = torch.randn(4, 6, D)
    eager = net(x)
    eager.backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad()
    compiled = torch.compile(net, backend="aot_eager")   # inductor works too, but compiles for ~1 min on 2 cores
    loss = compiled(x)
    loss.backward()
    torch.testing.assert_close(loss, eager)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], msg=lambda msg: f"grad of {n}: {msg}")


def test_loads_sigma_moe_checkpoints():
    torch.manual_seed(4)
    state = {"keys": torch.randn(E, D, H), "values": torch.randn(E, H, D), "expert_sel": torch.randn(E, D),
             "bias": torch.randn(E, H), "o_bias": torch.randn(D)}
    m = MoE(D, E, H, K, bias=True)
    m.load_state_dict(state)
    torch.testing.assert_close(m.keys, state["keys"])
    torch.testing.assert_close(m.values, state["values"])
    torch.testing.assert_close(m.expert_sel, state["expert_sel"])
    m = m.double().eval()
    x = torch.randn(5, D, dtype=torch.float64)
    torch.testing.assert_close(m(x)[0], sigma_reference(m, x, "sigmoid", False)[0])


def test_dropout_and_expert_dropout_only_in_training():
    m = MoE(D, E, H, K, dropout=0.5, expert_dropout=0.3)
    x = torch.randn(16, D)
    m.eval()
    torch.testing.assert_close(m(x)[0], m(x)[0])
    m.train()
    assert not torch.equal(m(x)[0], m(x)[0])


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(selection_mode="gumbel"), ValueError, "selection_mode"),
    (dict(k=E + 1), ValueError, "k must"),
    (dict(n_experts=0), ValueError, "n_experts"),
    (dict(dropout=1.5), ValueError, "dropout"),
    (dict(expert_dropout=-0.1), ValueError, "expert_dropout"),
    (dict(v_dim=0), ValueError, "v_dim"),
    (dict(activation="relu!"), TypeError, "activation"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, word):
    args = dict(dmodel=D, n_experts=E, expert_size=H, k=K)
    with pytest.raises(exc, match=word):
        MoE(**{**args, **kwargs})


def test_wrong_input_dims():
    m = MoE(D, E, H, K)
    with pytest.raises(ValueError, match="model_dim"):
        m(torch.randn(3, D + 2))
    with pytest.raises(ValueError, match="top_k"):
        m(torch.randn(3, D), top_k=E + 1)
