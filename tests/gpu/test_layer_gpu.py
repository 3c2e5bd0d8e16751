"""The whole layer on a GPU under torch.compile (inductor, fullgraph) and CUDA-graph capture:
the same outputs and gradients as eager calls."""
import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import adaptmoe as am  # noqa: E402

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
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        layer(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = layer(x)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        with torch.no_grad():
            ref = layer(x)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)   # the same kernels on the same inputs

