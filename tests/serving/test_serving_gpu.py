"""GPU: CUDA-graph capture + replay equals eager, torch.compile works, decode reads only selected
experts with torch._grouped_mm. Skipped without CUDA (run ``pytest -m gpu tests/serving``)."""
from __future__ import annotations

import pytest
import torch

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer, decode
from adaptmoe.serving import CudaGraphRunner, ServingMoE
from reference import reference_forward

pytestmark = pytest.mark.gpu
D = 64


def make_layer(dtype, kind="gated_ffn", seed=0) -> MoELayer:
    torch.manual_seed(seed)
    # fp32 routing: a bf16 gate can flip near-tied choices against the float64 reference, and then
    # whole expert outputs differ (seen on the H100), which says nothing about the serving path.
    config = MoEConfig(model_dim=D, num_experts=8, gate=GateConfig(top_k=2, capacity_factor=1.0, fp32=True),
                       experts=ExpertConfig(kind=kind, hidden_size=128, activation="silu"))
    with torch.device("cuda"):
        layer = MoELayer(config)
    return layer.to(dtype).eval()


def assert_rel_close(got, expected, tol):
    err = (got.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), 1e-6)
    assert err <= tol * scale, f"max error {err:.3g} > {tol} x {scale:.3g}"


def tolerance(dtype):
    return 2e-2 if dtype == torch.bfloat16 else 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_eager_serving_matches_reference(dtype):
    layer = make_layer(dtype)
    cpu64 = make_layer(torch.float32).double().cpu()
    cpu64.load_state_dict({k: v.double().cpu() for k, v in layer.state_dict().items()})
    serving = ServingMoE(layer)
    for T in (0, 1, 3, 64, 65, 300):
        x = torch.randn(T, D, device="cuda", dtype=dtype)
        with torch.no_grad():
            y = serving(x)
        expected = reference_forward(cpu64, x.double().cpu(), capacity_factor=0.0)
        if T:
            assert_rel_close(y.cpu(), expected, tolerance(dtype) * 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_graph_replay_equals_eager(dtype):
    serving = ServingMoE(make_layer(dtype))
    runner = CudaGraphRunner(serving, max_graph_tokens=256)
    assert runner.capture([1, 2, 3, 16, 64, 100]) == [1, 2, 4, 16, 64, 128]
    inputs = {T: torch.randn(T, D, device="cuda", dtype=dtype) for T in (1, 3, 16, 50, 64, 100, 255)}
    with torch.no_grad():
        eager = {T: serving(x, kernel="decode") for T, x in inputs.items()}
    for _ in range(2):   # replays of other buckets in between must not clobber results
        for T, x in inputs.items():
            assert_rel_close(runner(x), eager[T], tolerance(dtype))
    assert set(runner.graphs) == {1, 2, 4, 16, 64, 128, 256}      # 50 -> 64, 255 -> 256 (on miss)
    assert runner.eager_calls == 0
    big = torch.randn(300, D, device="cuda", dtype=dtype)          # above max_graph_tokens: eager
    with torch.no_grad():
        assert_rel_close(runner(big), serving(big), tolerance(dtype))
    assert runner.eager_calls == 1


def test_split_k_decode_graph_equals_unsplit_eager():
    layer = make_layer(torch.bfloat16)
    plain, split = ServingMoE(layer), ServingMoE(layer, decode_split_k=4)
    runner = CudaGraphRunner(split, max_graph_tokens=64)
    for T in (1, 4, 16, 64):
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            expected = plain(x, kernel="decode")
            assert_rel_close(split(x, kernel="decode"), expected, 2e-2)
        assert_rel_close(runner(x), expected, 2e-2)


def test_graph_runner_without_capture_on_miss_runs_eagerly():
    serving = ServingMoE(make_layer(torch.bfloat16))
    runner = CudaGraphRunner(serving, capture_on_miss=False)
    x = torch.randn(5, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert_rel_close(runner(x), serving(x), 2e-2)
    assert runner.eager_calls == 1 and not runner.graphs


def test_grouped_mm_decode_never_reads_unselected_experts():
    layer = make_layer(torch.bfloat16)
    x = torch.randn(2, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = decode.decode_forward(layer, x, top_k=2, method="dense")
        indices_TK, _ = decode.route_tokens(layer, x, top_k=2)
        unused = sorted(set(range(8)) - set(indices_TK.flatten().tolist()))
        for w in (layer.experts.batched_fc1_w, layer.experts.batched_fc2_w, layer.experts.batched_fc3_w):
            w[unused] = float("nan")
        method = "grouped_mm" if decode.grouped_mm_supported(x, 128, D) else "gather"
        y = decode.decode_forward(layer, x, top_k=2, method=method)
    assert torch.isfinite(y).all(), method
    assert_rel_close(y, expected, 2e-2)


def test_torch_compile_decode_fullgraph_and_model():
    torch._dynamo.reset()
    serving = ServingMoE(make_layer(torch.bfloat16))
    serving.prepare(64)
    compiled = torch.compile(serving, fullgraph=True, dynamic=False)
    for T in (1, 8):
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            assert_rel_close(compiled(x), serving(x), 2e-2)
    model = torch.nn.Sequential(torch.nn.Linear(D, D), serving, torch.nn.Linear(D, D)).to("cuda", torch.bfloat16)
    compiled_model = torch.compile(model, dynamic=False)
    x = torch.randn(4, D, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert_rel_close(compiled_model(x), model(x), 2e-2)
