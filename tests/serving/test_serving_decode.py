"""The decode path: every method equals the reference, touches only the selected experts, masks
padding, and traces without graph breaks."""
from __future__ import annotations

import math

import pytest
import torch

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer, decode
from adaptmoe.serving import ServingMoE
from reference import reference_forward


def make_layer(kind="gated_ffn", dtype=torch.float64, postscore=True, E=8, k=2, seed=0) -> MoELayer:
    torch.manual_seed(seed)
    act = "silu" if kind == "gated_ffn" else "relu"
    config = MoEConfig(model_dim=16, num_experts=E, gate=GateConfig(top_k=k, capacity_factor=0.0),
                       experts=ExpertConfig(kind=kind, hidden_size=24, activation=act), is_postscore=postscore)
    return MoELayer(config).to(dtype).eval()


def methods_for(dtype):
    return ["gather", "dense", "auto"] + (["grouped_mm"] if dtype != torch.float64 else [])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind, postscore", [("gated_ffn", True), ("ffn", False), ("ffn", True)])
def test_methods_equal_reference(dtype, kind, postscore):
    layer = make_layer(kind, dtype, postscore)
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for T in (0, 1, 2, 5, 33):
        x = torch.randn(T, 16, dtype=dtype)
        expected = reference_forward(layer, x, capacity_factor=0.0).to(dtype)
        for method in methods_for(dtype):
            with torch.no_grad():
                y = decode.decode_forward(layer, x, top_k=2, method=method)
            torch.testing.assert_close(y, expected, rtol=tol, atol=tol, msg=f"T={T} method={method}")


@pytest.mark.parametrize("method", ["gather", "grouped_mm"])
def test_unselected_experts_are_never_read(method):
    """Poison every expert the tokens did not select: the output stays finite and exact."""
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(3, 16)
    expected = reference_forward(layer, x, capacity_factor=0.0).float()
    with torch.no_grad():
        indices_TK, _ = decode.route_tokens(layer, x, top_k=2)
        unused = sorted(set(range(8)) - set(indices_TK.flatten().tolist()))
        assert unused, "test needs at least one unselected expert"
        for w in (layer.experts.batched_fc1_w, layer.experts.batched_fc2_w, layer.experts.batched_fc3_w):
            w[unused] = float("nan")
        y = decode.decode_forward(layer, x, top_k=2, method=method)
    torch.testing.assert_close(y, expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_padding_tokens_are_masked(dtype):
    layer = make_layer(dtype=dtype)
    x = torch.randn(8, 16, dtype=dtype)
    x[5:] = float("nan")   # padding content must not leak anywhere
    expected = reference_forward(layer, x[:5], capacity_factor=0.0).to(dtype)
    valid_T = decode.valid_mask(8, torch.tensor(5), x.device)
    for method in methods_for(dtype):
        with torch.no_grad():
            y = decode.decode_forward(layer, x, top_k=2, method=method, valid_T=valid_T)
        assert torch.equal(y[5:], torch.zeros_like(y[5:])), method
        tol = 1e-12 if dtype == torch.float64 else 2e-5
        torch.testing.assert_close(y[:5], expected, rtol=tol, atol=tol)
    serving = ServingMoE(layer)
    with torch.no_grad():
        y = serving(x, num_valid_tokens=torch.tensor(5))
    assert torch.equal(y[5:], torch.zeros_like(y[5:]))


def test_expected_distinct_and_rule():
    assert decode.expected_distinct_experts(0, 8, 2) == 0.0
    assert decode.expected_distinct_experts(1, 8, 2) == pytest.approx(2.0)
    assert decode.expected_distinct_experts(4, 8, 2) == pytest.approx(8 * (1 - 0.75 ** 4))
    assert decode.expected_distinct_experts(10_000, 8, 2) == pytest.approx(8.0)
    assert [decode.decode_beats_grouped(t, 8, 2) for t in (0, 1, 16, 64, 65, 4096)] == \
        [False, True, True, True, False, False]
    # Many small experts: 64 tokens x k=8 over 256 experts still reads fewer weights than it computes.
    assert decode.decode_beats_grouped(64, 256, 8)
    assert not decode.decode_beats_grouped(64, 8, 2, ridge_rows=8)   # 16 rows/expert above the ridge


def test_bad_method_names_allowed_values():
    layer = make_layer()
    with pytest.raises(ValueError, match=r"method must be one of \['auto', 'native', 'grouped_mm', 'gather', 'dense'\]"):
        decode.decode_forward(layer, torch.randn(2, 16, dtype=torch.float64), top_k=2, method="cutlass")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_serving_traces_without_graph_breaks(dtype):
    """fullgraph=True fails on any graph break inside ServingMoE's decode call (dynamo, eager backend)."""
    torch._dynamo.reset()
    layer = make_layer(dtype=dtype)
    serving = ServingMoE(layer)
    serving.prepare(64)
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    compiled = torch.compile(serving, fullgraph=True, backend="eager", dynamic=False)
    for T in (1, 5):
        x = torch.randn(T, 16, dtype=dtype)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), serving(x), rtol=tol, atol=tol)
    padded = torch.compile(lambda x, n: serving(x, num_valid_tokens=n), fullgraph=True, backend="eager")
    x = torch.randn(8, 16, dtype=dtype)
    with torch.no_grad():
        y = padded(x, torch.tensor(3))
        torch.testing.assert_close(y[:3], serving(x[:3]), rtol=tol, atol=tol)
    assert math.isclose(float(y[3:].abs().sum()), 0.0)


@pytest.mark.parametrize("dtype, splits", [(torch.float32, (2, 4, 8)), (torch.bfloat16, (2, 4))])
def test_split_k_down_projection_equals_unsplit(dtype, splits):
    """The split-K down projection (more thread blocks for few rows) gives the unsplit result,
    with empty experts, masked rows and an output bias."""
    torch.manual_seed(0)
    config = MoEConfig(model_dim=16, num_experts=8, gate=GateConfig(top_k=2, capacity_factor=0.0),
                       experts=ExpertConfig(kind="gated_ffn", hidden_size=32, activation="silu", has_fc2_bias=True))
    layer = MoELayer(config).to(dtype).eval()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for T in (1, 3, 20):
        x = torch.randn(T, 16, dtype=dtype)
        valid_T = decode.valid_mask(T, torch.tensor(max(T - 1, 1)), x.device)
        with torch.no_grad():
            base = decode.decode_forward(layer, x, top_k=2, method="grouped_mm", split_k=1)
            for s in splits:
                y = decode.decode_forward(layer, x, top_k=2, method="grouped_mm", split_k=s)
                torch.testing.assert_close(y, base, rtol=tol, atol=tol)
                masked = decode.decode_forward(layer, x, top_k=2, method="grouped_mm", split_k=s, valid_T=valid_T)
                n = max(T - 1, 1)
                torch.testing.assert_close(masked[:n], base[:n], rtol=tol, atol=tol)
                assert torch.equal(masked[n:], torch.zeros_like(masked[n:]))
    with pytest.raises(ValueError, match="split_k must divide hidden=32 into slices of a multiple of 16 bytes"):
        decode.decode_forward(layer, torch.randn(2, 16, dtype=dtype), top_k=2, split_k=3)


@pytest.mark.parametrize("kind, postscore", [("gated_ffn", True), ("ffn", False), ("ffn", True)])
def test_decode_ffn_op_equals_brute_force(kind, postscore):
    """adaptmoe::decode_ffn's reference (what the CUDA kernels are tested against) is the layer."""
    from adaptmoe import ops
    layer = make_layer(kind, torch.float64, postscore)
    for T in (1, 5):
        x = torch.randn(T, 16, dtype=torch.float64)
        with torch.no_grad():
            indices_TK, weights_TK = decode.route_tokens(layer, x, top_k=2)
            y = ops.decode_ffn(x, indices_TK, weights_TK, postscore, tuple(layer.experts.stored_weights()),
                               layer.experts.activation, 1, torch.float64)
        expected = reference_forward(layer, x, capacity_factor=0.0)
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
        masked = torch.where(torch.arange(T).unsqueeze(1) < T - 1, indices_TK, 8)   # last token: padding
        with torch.no_grad():
            y_masked = ops.decode_ffn(x, masked, weights_TK, postscore, tuple(layer.experts.stored_weights()),
                                      layer.experts.activation, 1, torch.float64)
        assert torch.equal(y_masked[-1], torch.zeros_like(y_masked[-1]))
        torch.testing.assert_close(y_masked[:-1], expected[:-1], rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            y_counted = ops.decode_ffn(x, indices_TK, weights_TK, postscore, tuple(layer.experts.stored_weights()),
                                       layer.experts.activation, 1, torch.float64, torch.tensor(T - 1))
        assert torch.equal(y_counted, y_masked)


def test_native_method_says_why_it_cannot_serve():
    layer = make_layer(dtype=torch.float32)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="method 'native' cannot serve this call: not a CUDA tensor"):
        decode.decode_forward(layer, x, top_k=2, method="native")
    from adaptmoe import ops
    with pytest.raises(ValueError, match="built-in activations"):
        ops.decode_ffn(x, torch.zeros(2, 2, dtype=torch.long), None, False, tuple(layer.experts.stored_weights()),
                       lambda t: t * 2, 1, torch.float32)


def test_decode_ffn_op_traces_fullgraph():
    from adaptmoe import ops
    torch._dynamo.reset()
    layer = make_layer("ffn", torch.float32)
    w = tuple(layer.experts.stored_weights())
    x = torch.randn(3, 16)
    indices_TK, weights_TK = decode.route_tokens(layer, x, top_k=2)

    def fn(x_TD, e_TK, w_TK):
        return ops.decode_ffn(x_TD, e_TK, w_TK, True, w, layer.experts.activation, 1, torch.float32)

    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fn, fullgraph=True)(x, indices_TK, weights_TK),
                                   fn(x, indices_TK, weights_TK))


def test_decode_ffn_bad_arguments_are_named():
    from adaptmoe import ops
    layer = make_layer("ffn", torch.float32)
    w = layer.experts.stored_weights()
    x, e = torch.randn(2, 16), torch.zeros(2, 2, dtype=torch.long)
    act = layer.experts.activation
    with pytest.raises(ValueError, match="w2_EHO"):
        ops.decode_ffn(x, e, None, False, (w.w1_eHD, w.w2_eHO.double(), None, None, None), act, 0, torch.float32)
    with pytest.raises(ValueError, match="splits"):
        ops.decode_ffn(x, e, None, False, tuple(w), act, -1, torch.float32)
    with pytest.raises(ValueError, match="e_TK"):
        ops.decode_ffn(x, e.int(), None, False, tuple(w), act, 0, torch.float32)
    with pytest.raises(ValueError, match="out_dtype"):
        ops.decode_ffn(x, e, None, False, tuple(w), act, 0, torch.int32)


def test_act_mul_reference_and_trace():
    """adaptmoe::act_mul off CUDA is the PyTorch expression; it traces as one opaque op."""
    from adaptmoe.ops._decode_op import ACTIVATION_CODES, ACTIVATION_FNS, act_mul_op
    torch._dynamo.reset()
    g, u = torch.randn(5, 24), torch.randn(5, 24)
    for name in ("silu", "gelu", "relu"):
        expected = ACTIVATION_FNS[name](g) * u
        torch.testing.assert_close(act_mul_op(g, u, ACTIVATION_CODES[name]), expected)
    compiled = torch.compile(lambda a, b: act_mul_op(a, b, ACTIVATION_CODES["silu"]), fullgraph=True)
    torch.testing.assert_close(compiled(g, u), ACTIVATION_FNS["silu"](g) * u)
