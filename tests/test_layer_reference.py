"""The layer against the brute-force float64 per-token reference: outputs and gradients."""
import itertools

import pytest
import torch

import adaptmoe as am
from reference import reference_forward

GATE_KINDS = ["softmax", "sigmoid", "cosine", "sinkmoid"]


def make_layer(kind="softmax", k=2, cf=1.0, bias=True, E=4, D=8, H=12, expert_kind="ffn", **gate_kw):
    torch.manual_seed(1234)
    gate = am.GateConfig(kind=kind, top_k=k, capacity_factor=cf, **gate_kw)
    experts = am.ExpertConfig(kind=expert_kind, hidden_size=H, has_fc1_bias=bias, has_fc2_bias=bias,
                              activation="relu" if expert_kind == "ffn" else "silu")
    return am.MoELayer(am.MoEConfig(model_dim=D, num_experts=E, gate=gate, experts=experts)).double().eval()


def compare_with_reference(layer, x, **call):
    x1 = x.clone().requires_grad_(True)
    y = layer(x1, **call)
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                [x1, *params.values()], allow_unused=True)
    x2 = x.clone().requires_grad_(True)
    ref = reference_forward(layer, x2, top_k=call.get("top_k"), capacity_factor=call.get("capacity_factor"))
    ref_grads = torch.autograd.grad((ref * torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype).view_as(ref)).sum(),
                                    [x2, *params.values()], allow_unused=True)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for name, g, rg in zip(["input", *params], grads, ref_grads):
        g = torch.zeros_like(rg) if g is None and rg is not None else g
        rg = torch.zeros_like(g) if rg is None and g is not None else rg
        if g is not None:
            torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-10, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("kind,k,cf,bias", list(itertools.product(GATE_KINDS, [1, 2, 4], [1.0, 1.25, 0.0, -1.5],
                                                                  [True, False])))
def test_matches_reference(kind, k, cf, bias):
    layer = make_layer(kind, k, cf, bias)
    x = torch.randn(11, 8, dtype=torch.float64)
    compare_with_reference(layer, x)


@pytest.mark.parametrize("cf", [0.3, 1.0])
def test_tokens_dropped_by_capacity_are_dropped(cf):
    layer = make_layer("softmax", 2, cf)
    x = torch.randn(16, 8, dtype=torch.float64)
    layer(x)
    routing = layer.last_routing
    assert routing.capacity is not None and bool((routing.slots_TK < 0).any()), "this case must drop tokens"
    compare_with_reference(layer, x)


def test_expert_with_zero_tokens():
    layer = make_layer("softmax", 2, 1.0)
    with torch.no_grad():
        layer.gates[0].wg.weight[3] = -10.0     # positive inputs never pick expert 3
    x = torch.rand(9, 8, dtype=torch.float64) + 0.1
    for cf in (1.0, 0.0):
        layer(x, capacity_factor=cf)
        assert int(layer.last_routing.counts_E[3]) == 0
        compare_with_reference(layer, x, capacity_factor=cf)


@pytest.mark.parametrize("cf", [1.0, 0.0])
def test_k_equals_num_experts_and_one_token(cf):
    layer = make_layer("softmax", 4, cf)
    compare_with_reference(layer, torch.randn(7, 8, dtype=torch.float64))
    compare_with_reference(layer, torch.randn(1, 8, dtype=torch.float64))


def test_zero_tokens():
    layer = make_layer("softmax", 2, 1.0)
    x = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    for cf in (1.0, 0.0, -1.0):
        y = layer(x, capacity_factor=cf)
        assert y.shape == (0, 8) and float(y.l_aux) == 0.0
        y.sum().backward()


@pytest.mark.parametrize("expert_kind", ["ffn", "gated_ffn"])
def test_per_call_knobs_and_expert_kinds(expert_kind):
    layer = make_layer("softmax", 2, 1.0, expert_kind=expert_kind)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    for call in ({"top_k": 1}, {"top_k": 3, "capacity_factor": 0.0}, {"capacity_factor": -0.5}, {}):
        compare_with_reference(layer, x, **call)


def test_activation_after_topk_and_prescore():
    for kind in ("softmax", "sigmoid"):
        compare_with_reference(make_layer(kind, 2, 0.0, activation_after_topk=True), torch.randn(9, 8, dtype=torch.float64))
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=8, num_experts=4, gate=am.GateConfig(top_k=2), is_postscore=False,
                       experts=am.ExpertConfig(hidden_size=12))
    compare_with_reference(am.MoELayer(cfg).double(), torch.randn(10, 8, dtype=torch.float64))


@pytest.mark.parametrize("cf", [1.0, 0.0])
def test_batch_prioritized_routing(cf):
    layer = make_layer("softmax", 2, cf, batch_prioritized=True)
    compare_with_reference(layer, torch.randn(14, 8, dtype=torch.float64))


def test_deterministic_with_same_seeds():
    def build():
        cfg = am.MoEConfig(model_dim=8, num_experts=4, experts=am.ExpertConfig(hidden_size=12))
        return am.MoELayer(cfg, seeds=(1, 2, 3))
    a, b = build(), build()
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)
    x = torch.randn(6, 8)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.float16, 1e-2)])
def test_low_precision_dtypes_close_to_reference(dtype, tol):
    layer = make_layer("softmax", 2, 0.0, fp32=True).to(dtype)
    x = torch.randn(12, 8).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = reference_forward(layer, x)
    err = (y.double() - ref).norm() / ref.norm()
    assert err < tol, f"relative error {err:.2e} for {dtype}"


def test_routing_stays_out_of_autocast():
    """Under bf16 autocast the experts run in bf16 but the gate and routing do not: the same
    choices, fp32 weights (differing only by the tokens' bf16 rounding, Tutel's input cast) and
    an output close to the fp32 one."""
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=16, num_experts=8, gate=am.GateConfig(top_k=2), experts=am.ExpertConfig(hidden_size=32))
    layer = am.MoELayer(cfg)
    x = torch.randn(64, 16)
    y32 = layer(x)
    routing32 = layer.last_routing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = layer(x)
    routing16 = layer.last_routing
    assert torch.equal(routing16.indices_TK, routing32.indices_TK)
    assert routing16.weights_TK.dtype == torch.float32
    torch.testing.assert_close(routing16.weights_TK, routing32.weights_TK, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)


def test_forget_last_call_drops_the_references_to_the_last_graph():
    layer = make_layer("softmax", 2, 1.0)
    x = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert layer.l_aux is not None and layer.l_aux.grad_fn is not None and layer.last_routing is not None
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.forget_last_call()
    assert layer.l_aux is None and layer.losses == {} and layer.last_routing is None
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    y.sum().backward()   # the caller's own references still work
    assert x.grad is not None


@pytest.mark.parametrize("shape,reserve_dims,dtype", [
    ((6, 16), 1, torch.float32),          # the shortcut: plain 2-D tokens in the compute dtype
    ((6, 16), 1, torch.float64),          # converted to the experts' dtype
    ((2, 3, 16), 1, torch.float32),       # leading dims flattened and restored
    ((2, 3, 4, 4), 2, torch.float32),     # two trailing dims form a token
])
def test_input_shortcut_and_general_flattening_agree(shape, reserve_dims, dtype):
    """forward's shortcut for plain 2-D inputs takes exactly the tensors the general
    flatten_input would, and every input form gives the flattened call's outputs in its own
    shape and dtype."""
    torch.manual_seed(0)
    layer = am.MoELayer(am.MoEConfig(model_dim=16, num_experts=4, gate=am.GateConfig(top_k=2),
                                     experts=am.ExpertConfig(hidden_size=8)))
    x = torch.randn(*shape, dtype=dtype)
    x_TD, lead = layer._tokens_of(x, reserve_dims)
    want_TD, want_lead = layer.flatten_input(x, reserve_dims)
    assert lead == want_lead and x_TD.dtype == want_TD.dtype and torch.equal(x_TD, want_TD)
    assert (x_TD is x) == (len(shape) == 2 and dtype == torch.float32)
    with torch.no_grad():
        y = layer(x, reserve_dims=reserve_dims)
        y_flat = layer(want_TD)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.reshape(-1, 16).to(y_flat.dtype), y_flat, rtol=0, atol=0)
    param_like = torch.nn.Parameter(torch.randn(6, 16), requires_grad=False)   # a subclass: general path
    assert torch.equal(layer._tokens_of(param_like, 1)[0], param_like)


def test_input_shortcut_under_autocast_takes_what_flatten_input_takes():
    layer = am.MoELayer(am.MoEConfig(model_dim=16, num_experts=4, gate=am.GateConfig(top_k=2),
                                     experts=am.ExpertConfig(hidden_size=8)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for x in (torch.randn(5, 16), torch.randn(5, 16).bfloat16()):
            got, want = layer._tokens_of(x, 1)[0], layer.flatten_input(x, 1)[0]
            assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    with pytest.raises(TypeError, match="floating-point"):   # the shortcut never lets integers through
        layer._tokens_of(torch.ones(5, 16, dtype=torch.int64), 1)


@pytest.mark.parametrize("expert_kind,bias", [("ffn", True), ("ffn", False), ("gated_ffn", False)])
@pytest.mark.parametrize("cf", [1.0, 0.0, -1.0])
def test_every_token_to_every_expert_runs_dense_and_matches_reference(expert_kind, bias, cf, monkeypatch):
    """k == E, post-scored, nothing dropped: the experts run over the tokens themselves
    (``forward_dense``: no dispatch, combine from token-major rows); outputs and gradients equal
    the float64 reference. A pre-scored layer, or a capacity that drops, keeps the dispatch."""
    layer = make_layer("softmax", 4, cf, bias, expert_kind=expert_kind)
    dense_calls = []
    real = type(layer.experts).forward_dense
    monkeypatch.setattr(type(layer.experts), "forward_dense",
                        lambda self, x_TD: dense_calls.append(x_TD.shape[0]) or real(self, x_TD))
    compare_with_reference(layer, torch.randn(13, 8, dtype=torch.float64))
    assert dense_calls == [13]
    compare_with_reference(layer, torch.randn(13, 8, dtype=torch.float64), capacity_factor=0.5)   # drops
    assert dense_calls == [13]
