"""Bad input raises a clear error naming the argument, before any state changes."""
import math

import pytest
import torch

import adaptmoe as am


def layer():
    torch.manual_seed(0)
    return am.MoELayer(am.MoEConfig(model_dim=8, num_experts=4, gate=am.GateConfig(top_k=2),
                                    experts=am.ExpertConfig(hidden_size=12)))


def snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("call,error,needle", [
    (lambda l: l(torch.randn(3, 9)), ValueError, "model_dim"),
    (lambda l: l(torch.randint(0, 5, (3, 8))), TypeError, "floating-point"),
    (lambda l: l(torch.randn(3, 8), top_k=0), ValueError, "top_k"),
    (lambda l: l(torch.randn(3, 8), top_k=5), ValueError, "top_k"),
    (lambda l: l(torch.randn(3, 8), capacity_factor=math.nan), ValueError, "capacity_factor"),
    (lambda l: l(torch.randn(3, 8), capacity_factor="1"), TypeError, "capacity_factor"),
    (lambda l: l(torch.randn(3, 8), adaptive_r=2), ValueError, "adaptive_r"),
    (lambda l: l(torch.randn(3, 8), a2a_ffn_overlap_degree=0), ValueError, "a2a_ffn_overlap_degree"),
    (lambda l: l(torch.randn(3, 8), a2a_algo="ring"), ValueError, "a2a_algo"),
    (lambda l: l(torch.randn(3, 8), gate_index=1), ValueError, "gate_index"),
    (lambda l: l(torch.randn(3, 8), megablocks_size=-1), ValueError, "megablocks_size"),
])
def test_bad_call_raises_and_leaves_layer_unchanged(call, error, needle):
    l = layer()
    before = snapshot(l)
    l(torch.randn(2, 8))
    l_aux_before = l.l_aux
    with pytest.raises(error, match=needle):
        call(l)
    after = snapshot(l)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert l.l_aux is l_aux_before


@pytest.mark.parametrize("build,needle", [
    (lambda: am.GateConfig(kind="topk").validate(4), "gate kind"),
    (lambda: am.GateConfig(top_k=0).validate(4), "top_k"),
    (lambda: am.GateConfig(top_k=5).validate(4), "top_k"),
    (lambda: am.GateConfig(capacity_factor=math.inf).validate(4), "capacity_factor"),
    (lambda: am.GateConfig(losses=("aux",)).validate(4), "loss"),
    (lambda: am.ExpertConfig(kind="mlp", hidden_size=4).validate(), "expert kind"),
    (lambda: am.ExpertConfig(hidden_size=0).validate(), "hidden_size"),
    (lambda: am.ExpertConfig(hidden_size=4, activation="relu6").validate(), "activation"),
    (lambda: am.MoEConfig(model_dim=0, num_experts=2).validate(), "model_dim"),
    (lambda: am.MoELayer(am.MoEConfig(model_dim=4, num_experts=2, adaptive_r=2,
                                      experts=am.ExpertConfig(hidden_size=4))), "adaptive_r"),
    (lambda: am.MoEConfig(model_dim=4, num_experts=2, a2a_algo="tree",
                          experts=am.ExpertConfig(hidden_size=4)).validate(), "a2a_algo"),
])
def test_bad_config_names_the_field(build, needle):
    with pytest.raises((ValueError, TypeError), match=needle):
        build()


@pytest.mark.parametrize("good,bad,error,needle", [
    ({"top_k": 1}, {"top_k": True}, ValueError, "top_k"),                 # True == 1 and hashes alike
    ({"gate_index": 0}, {"gate_index": False}, ValueError, "gate_index"),
    ({"capacity_factor": 1.0}, {"capacity_factor": True}, TypeError, "capacity_factor"),
    ({"top_k": 2}, {"top_k": [2]}, ValueError, "top_k"),                  # unhashable: still named
    ({"a2a_algo": "flat"}, {"a2a_algo": ["flat"]}, ValueError, "a2a_algo"),
])
def test_remembered_knobs_never_pass_a_bad_call(good, bad, error, needle):
    """forward remembers knob tuples that passed the checks (host time per call); a bad value that
    compares or hashes equal to a remembered good one, or cannot be hashed, is still refused."""
    l = layer()
    x = torch.randn(3, 8)
    l(x, **good)
    l(x, **good)
    with pytest.raises(error, match=needle):
        l(x, **bad)


def test_remembered_knobs_give_the_same_call_and_stay_bounded(monkeypatch):
    from adaptmoe import layer as layer_module
    monkeypatch.setattr(layer_module, "_MAX_RESOLVED_CALLS", 4)
    l = layer()
    x = torch.randn(5, 8)
    with torch.no_grad():
        first = l(x, capacity_factor=0.5, top_k=1)
        for cf in (1.0, 1.5, 2.0, 2.5, 3.0, 0.5):   # more tuples than the bound: the memo starts over
            l(x, capacity_factor=cf, top_k=1)
            assert len(l._resolved_calls) <= 4
        again = l(x, capacity_factor=0.5, top_k=1)
    assert torch.equal(first, again)
    want = l.resolve_knobs(capacity_factor=0.5, top_k=1)
    assert any(knobs == want for knobs, _ in l._resolved_calls.values())
