"""The whole layer on a GPU under torch.compile (inductor, fullgraph) and CUDA-graph capture:
the same outputs and gradients as eager calls."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import adaptmoe as am  # noqa: E402
from graph_replay import WithAux, eager_step_then_forget, replays_and_eager  # noqa: E402

DEV = "cuda"
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def make_layer(dtype, cf):
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=64, num_experts=4, gate=am.GateConfig(top_k=2, capacity_factor=cf),
                       experts=am.ExpertConfig(hidden_size=128))
    return am.MoELayer(cfg).to(device=DEV, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cf", [1.0, 0.0])
def test_layer_compiles_with_inductor_and_matches_eager(dtype, cf):
    layer = make_layer(dtype, cf)
    x = torch.randn(96, 64, device=DEV, dtype=dtype)
    g = torch.randn(96, 64, device=DEV, dtype=dtype)
    params = list(layer.parameters())

    def step(fn):
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        grads = torch.autograd.grad([y, y.l_aux], [xi, *params], [g, torch.ones_like(y.l_aux)])
        return y.detach(), grads

    y_ref, grads_ref = step(layer)
    y, grads = step(torch.compile(layer, fullgraph=True))
    tol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_capacity_layer_forward_replays_from_a_cuda_graph(dtype):
    layer = make_layer(dtype, 1.0).eval()
    x = torch.randn(96, 64, device=DEV, dtype=dtype)
    for out, ref in replays_and_eager(lambda: layer(x), x):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)   # the same kernels on the same inputs



@pytest.mark.parametrize("cf", [1.0, 0.0])
def test_training_step_through_make_graphed_callables_matches_eager(cf):
    """After an eager training step (on the default stream) and forget_last_call(), forward and
    backward replay from CUDA graphs (torch.cuda.make_graphed_callables) with the same output,
    l_aux and gradients as the eager layer. Without forget_last_call() the backward capture fails
    (the layer's l_aux keeps the eager step's AccumulateGrad nodes alive: scripts/debug_graphed_train.py)."""
    layer = make_layer(torch.float32, cf)
    module = WithAux(layer)
    x = torch.randn(96, 64, device=DEV, requires_grad=True)
    eager_step_then_forget(module, x)
    graphed = torch.cuda.make_graphed_callables(module, (x,))
    params = list(layer.parameters())
    for _ in range(2):
        x_new = torch.randn(96, 64, device=DEV)
        g = torch.randn(96, 64, device=DEV)
        results = []
        for fn in (graphed, module):
            xi = x_new.clone().requires_grad_(True)
            y, l_aux = fn(xi)
            grads = torch.autograd.grad([y, l_aux], [xi, *params], [g, torch.ones_like(l_aux)])
            results.append((y.detach().clone(), l_aux.detach().clone(), [t.clone() for t in grads]))
        (y_g, l_g, grads_g), (y_e, l_e, grads_e) = results
        torch.testing.assert_close(y_g, y_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(l_g, l_e, rtol=1e-5, atol=1e-5)
        for a, b in zip(grads_g, grads_e):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
