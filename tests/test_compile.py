"""torch.compile(fullgraph=True) of the layer: no graph break inside it (capacity mode, CPU)."""
import pytest
import torch

import adaptmoe as am


@pytest.mark.parametrize("num_experts", [4, 2])   # 2: every token to every expert (the dense layout)
def test_layer_compiles_without_graph_breaks_and_matches_eager(num_experts):
    torch._dynamo.reset()   # a layer compiled earlier in this process with another capacity factor would recompile
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=16, num_experts=num_experts, gate=am.GateConfig(top_k=2, capacity_factor=1.0),
                       experts=am.ExpertConfig(hidden_size=32))
    layer = am.MoELayer(cfg)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 16, requires_grad=True)
    y_eager = layer(x)
    grad_eager = torch.autograd.grad(y_eager.sum(), [x, *layer.parameters()])
    y = compiled(x)
    grad = torch.autograd.grad(y.sum(), [x, *layer.parameters()])
    torch.testing.assert_close(y, y_eager)
    for g, ge in zip(grad, grad_eager):
        torch.testing.assert_close(g, ge)


def test_layers_of_different_capacity_factors_compile_with_dynamic_false():
    """The documented way to compile a model whose layers differ in capacity factor (default
    dynamic shapes turn the second layer's capacity factor into a symbolic float, and the capacity
    derived from it cannot be lifted into the graph: native/NOTES.md)."""
    torch._dynamo.reset()
    x = torch.randn(10, 16, requires_grad=True)
    for cf in (1.25, 1.0):
        torch.manual_seed(0)
        cfg = am.MoEConfig(model_dim=16, num_experts=4, gate=am.GateConfig(top_k=2, capacity_factor=cf),
                           experts=am.ExpertConfig(hidden_size=32))
        layer = am.MoELayer(cfg)
        y = torch.compile(layer, fullgraph=True, backend="aot_eager", dynamic=False)(x)
        grad = torch.autograd.grad(y.sum(), x)[0]
        y_eager = layer(x)
        torch.testing.assert_close(y, y_eager)
        torch.testing.assert_close(grad, torch.autograd.grad(y_eager.sum(), x)[0])
