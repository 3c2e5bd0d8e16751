"""One test per Tutel bug of tutel-semantics.md section 7.1 that adaptmoe fixes."""
import copy

import torch

import adaptmoe as am
from adaptmoe import dispatch as dispatch_ops
from adaptmoe import moe as tutel_moe
from adaptmoe.routing import build_routing
from reference import reference_forward


def test_batch_prioritized_routing_under_dropless_drops_nothing():
    # Tutel computed counts from the masked last row: true [4,6,5,1] came out [1,1,1,1].
    indices_TK = torch.tensor([[0, 1], [1, 2], [2, 0], [1, 2], [0, 1], [3, 2], [1, 0], [2, 1]])
    weights_TK = torch.full((8, 2), 0.5)
    priority_T = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    routing = build_routing(indices_TK, weights_TK, 4, 0.0, priority_T)
    assert routing.counts_E.tolist() == [4, 6, 5, 1]
    assert routing.capacity is None and bool((routing.slots_TK >= 0).all())
    assert sorted(routing.slots_TK.reshape(-1).tolist()) == list(range(16))


def test_capacity_factor_and_top_k_zero_are_not_swallowed():
    torch.manual_seed(0)
    layer = am.MoELayer(am.MoEConfig(model_dim=8, num_experts=4, gate=am.GateConfig(top_k=2, capacity_factor=0.25),
                                     experts=am.ExpertConfig(hidden_size=8))).double()
    x = torch.randn(16, 8, dtype=torch.float64)
    layer(x)
    assert layer.last_routing.capacity is not None     # default: fixed (small) capacity
    y = layer(x, capacity_factor=0)                      # per-call 0 means dropless, not "default"
    assert layer.last_routing.capacity is None
    torch.testing.assert_close(y, reference_forward(layer, x, capacity_factor=0.0))
    try:
        layer(x, top_k=0)
        raise AssertionError("top_k=0 must be rejected, not replaced by the default")
    except ValueError as err:
        assert "top_k" in str(err)


def test_config_dicts_are_not_mutated():
    gate = {"type": "top", "k": 1}
    experts = {"type": "ffn", "count_per_node": 2, "hidden_size_per_expert": 8}
    saved = copy.deepcopy((gate, experts))
    tutel_moe.moe_layer(gate_type=gate, model_dim=8, experts=experts)
    tutel_moe.moe_layer(gate_type=gate, model_dim=8, experts=experts)   # Tutel raises here
    assert (gate, experts) == saved


def test_float64_runs_in_float64():
    torch.manual_seed(0)
    layer = am.MoELayer(am.MoEConfig(model_dim=8, num_experts=4, experts=am.ExpertConfig(hidden_size=8))).double()
    x = torch.randn(9, 8, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    # fp32 dispatch would leave errors around 1e-7; float64 all the way stays near 1e-15.
    assert (y - reference_forward(layer, x)).abs().max() < 1e-12


def test_dispatch_is_keyed_by_dtype():
    # Tutel cached its first-compiled kernel per device only, so a second dtype ran the wrong kernel.
    slots_TK = torch.tensor([[0, 3], [2, -1], [1, 4]])
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.float16, torch.float32):
        x_TD = torch.randn(3, 5).to(dtype)
        out_RD = dispatch_ops.dispatch(x_TD, slots_TK, 6)
        assert out_RD.dtype == dtype
        torch.testing.assert_close(out_RD[3], x_TD[0], rtol=0, atol=0)
        torch.testing.assert_close(out_RD[2], x_TD[1], rtol=0, atol=0)
        assert torch.count_nonzero(out_RD[5]) == 0
        w_TK = torch.rand(3, 2).to(dtype)
        y_TD = dispatch_ops.combine(out_RD, slots_TK, w_TK)
        expected = (w_TK[:, :1] * x_TD).double() + torch.stack([w_TK[0, 1] * x_TD[0], 0 * x_TD[1], w_TK[2, 1] * x_TD[2]]).double()
        torch.testing.assert_close(y_TD.double(), expected, rtol=2e-2, atol=2e-2)
