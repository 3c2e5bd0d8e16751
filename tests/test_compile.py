"""torch.compile(fullgraph=True) of the layer: no graph break inside it (capacity mode, CPU)."""
import torch

import adaptmoe as am


def test_layer_compiles_without_graph_breaks_and_matches_eager():
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=16, num_experts=4, gate=am.GateConfig(top_k=2, capacity_factor=1.0),
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
