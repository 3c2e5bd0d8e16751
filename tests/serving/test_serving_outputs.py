"""Served calls (eval / no_grad) equal the float64 per-token reference for every token count."""
from __future__ import annotations

import pytest
import torch

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer
from adaptmoe.serving import ServingMoE
from reference import reference_forward

SWEEP = (0, 1, 2, 3, 7, 64, 65, 100, 129)
LAYERS = {
    # Mixtral-like: gated silu experts, softmax top-2; the config's cf=1 must not apply when serving.
    "gated_softmax_k2": dict(gate=GateConfig(top_k=2, capacity_factor=1.0),
                             experts=ExpertConfig(kind="gated_ffn", hidden_size=24, activation="silu")),
    # ffn with both biases, pre-score scaling, sigmoid gate, k=3.
    "ffn_bias_prescore_sigmoid_k3": dict(gate=GateConfig(kind="sigmoid", top_k=3, capacity_factor=1.0),
                                         experts=ExpertConfig(kind="ffn", hidden_size=20, activation="gelu"),
                                         is_postscore=False),
    # k=1, no renormalisation, cosine gate.
    "ffn_cosine_k1": dict(gate=GateConfig(kind="cosine", top_k=1, capacity_factor=2.0, cosine_proj_dim=8),
                          experts=ExpertConfig(kind="ffn", hidden_size=16, activation="relu")),
}


def make_layer(name: str, dtype=torch.float64, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    return MoELayer(MoEConfig(model_dim=16, num_experts=8, **LAYERS[name])).to(dtype).eval()


def ref(layer, x, cf=0.0):
    return reference_forward(layer, x, capacity_factor=cf)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("kernel", ["auto", "decode", "grouped"])
def test_every_token_count_matches_reference_dropless(name, kernel):
    layer = make_layer(name)
    serving = ServingMoE(layer, kernel=kernel)
    gen = torch.Generator().manual_seed(1)
    for T in SWEEP:
        x = torch.randn(T, 16, dtype=torch.float64, generator=gen)
        with torch.no_grad():
            y = serving(x)
        assert y.shape == (T, 16) and y.dtype == torch.float64
        torch.testing.assert_close(y, ref(layer, x), rtol=1e-12, atol=1e-12, msg=f"T={T} kernel={kernel}")


def test_no_grad_in_train_mode_is_dropless_and_eval_with_grad_too():
    layer = make_layer("gated_softmax_k2")
    x = torch.randn(64, 16, dtype=torch.float64)
    assert not torch.allclose(ref(layer, x, cf=1.0), ref(layer, x)), "cf=1 should drop here"
    serving = ServingMoE(layer.train())
    with torch.no_grad():
        torch.testing.assert_close(serving(x), ref(layer, x), rtol=1e-12, atol=1e-12)
    layer.eval()
    y = serving(x)   # eval, grad enabled: still served (dropless)
    torch.testing.assert_close(y.detach(), ref(layer, x).detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cf", [1.0, 2.0, -1.0])
def test_capacity_modes_stay_available(cf):
    layer = make_layer("gated_softmax_k2")
    x = torch.randn(37, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ServingMoE(layer)(x, capacity_factor=cf), ref(layer, x, cf), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ServingMoE(layer, capacity_factor=cf)(x), ref(layer, x, cf), rtol=1e-12, atol=1e-12)


def test_training_calls_go_to_the_layer_unchanged():
    layer = make_layer("gated_softmax_k2").train()
    serving = ServingMoE(layer)
    x = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    y = serving(x)
    torch.testing.assert_close(y, layer(x))            # the layer's own default (cf=1), with l_aux
    assert hasattr(y, "l_aux")
    y.sum().backward()
    assert x.grad is not None and layer.experts.batched_fc1_w.grad is not None


def test_leading_dims_top_k_and_gate_index():
    layer = make_layer("gated_softmax_k2")
    serving = ServingMoE(layer)
    x = torch.randn(2, 3, 16, dtype=torch.float64)
    with torch.no_grad():
        y = serving(x, top_k=3)
    assert y.shape == (2, 3, 16)
    expected = reference_forward(layer, x.reshape(6, 16), top_k=3, capacity_factor=0.0)
    torch.testing.assert_close(y.reshape(6, 16), expected, rtol=1e-12, atol=1e-12)


def test_large_token_counts_decode_equals_grouped():
    """65537 tokens (tiny dims): the sync-free decode kernel equals the layer's grouped path."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(model_dim=8, num_experts=4, gate=GateConfig(top_k=2),
                               experts=ExpertConfig(kind="gated_ffn", hidden_size=8, activation="silu"))).eval()
    x = torch.randn(65537, 8)
    with torch.no_grad():
        y_decode = ServingMoE(layer, kernel="decode")(x)
        y_grouped = ServingMoE(layer, kernel="grouped")(x)
        y_auto = ServingMoE(layer)(x)
    torch.testing.assert_close(y_decode, y_grouped, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_auto, y_grouped, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(kernel="fast"), r"kernel must be one of \['auto', 'decode', 'grouped', 'bmm'\]"),
    (dict(kernel="decode", capacity_factor=1.0), r"kernel 'decode' .* needs capacity_factor=0"),
    (dict(kernel="grouped", capacity_factor=1.0), r"kernel 'grouped' is dropless"),
    (dict(kernel="bmm"), r"kernel 'bmm' pads to a capacity"),
    (dict(kernel="grouped", num_valid_tokens=2), r"num_valid_tokens needs kernel 'decode' or 'auto'"),
    (dict(top_k=9), r"top_k must be an integer in \[1, 8\]"),
    (dict(capacity_factor="x"), r"capacity_factor must be a float"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    serving = ServingMoE(make_layer("gated_softmax_k2"))
    with torch.no_grad(), pytest.raises((ValueError, TypeError), match=match):
        serving(torch.randn(4, 16, dtype=torch.float64), **kwargs)


def test_bad_constructor_arguments():
    layer = make_layer("gated_softmax_k2")
    with pytest.raises(ValueError, match="kernel must be one of"):
        ServingMoE(layer, kernel="gemv")
    with pytest.raises(ValueError, match="decode_method must be one of"):
        ServingMoE(layer, decode_method="triton")
