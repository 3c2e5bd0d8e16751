"""The first expert GEMM with relu in cuBLASLt's epilogue (native bmm_nt_act) against a float64
reference, its gradients against the unfused expression's, graph capture, and the inputs it
refuses (run on the device machine: `pytest -m gpu tests/gpu`).

Legend: e experts, C rows per expert, D model dim, H hidden.
"""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs CUDA", allow_module_level=True)

from adaptmoe.expert_compute import FFNWeights, ffn_padded  # noqa: E402
from adaptmoe.ops import _fused_gemm  # noqa: E402
from adaptmoe.ops._fused_gemm import TOLERANCES, fused_fc1, fused_fc1_blocker  # noqa: E402

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 8, 8), (1, 5, 16, 24), (4, 37, 64, 128), (8, 256, 2048, 1024), (3, 0, 32, 16)]  # e, C, D, H


def tol(dtype):
    rtol, atol = TOLERANCES[dtype]
    return dict(rtol=rtol, atol=atol)


def poison(nbytes):
    torch.cuda.synchronize()
    junk = torch.empty(max(int(nbytes), 1 << 20) * 2, dtype=torch.uint8, device=DEV)
    junk.fill_(0xFF)   # NaN in every float dtype
    del junk


def operands(e, C, D, H, dtype, bias, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(e, C, D, generator=g, device=DEV).div_(D ** 0.5).to(dtype)
    w = torch.randn(e, H, D, generator=g, device=DEV).to(dtype)
    b = torch.randn(e, H, generator=g, device=DEV).to(dtype) if bias else None
    return x, w, b


def reference(x, w, b):
    h = torch.bmm(x.double(), w.double().transpose(1, 2))
    if b is not None:
        h = h + b.double().unsqueeze(1)
    return torch.relu(h)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("e,C,D,H", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_float64(e, C, D, H, dtype, bias):
    x, w, b = operands(e, C, D, H, dtype, bias)
    assert fused_fc1_blocker(x, w, b, F.relu) is None
    poison(e * C * H * x.element_size())
    with torch.no_grad():
        h = fused_fc1(x, w, b, F.relu)
    assert h.shape == (e, C, H) and h.dtype == dtype
    torch.testing.assert_close(h.double(), reference(x, w, b), **tol(dtype))
    assert (h >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_unfused(dtype, bias):
    e, C, D, H = 4, 40, 64, 96
    x, w, b = operands(e, C, D, H, dtype, bias, seed=1)
    g = torch.randn(e, C, H, device=DEV, dtype=dtype)
    leaves = [t.clone().requires_grad_(True) for t in (x, w) + ((b,) if bias else ())]
    ref = [t.detach().double().requires_grad_(True) for t in leaves]
    fused = fused_fc1(leaves[0], leaves[1], leaves[2] if bias else None, F.relu)
    fused.backward(g)
    reference(ref[0], ref[1], ref[2] if bias else None).backward(g.double())
    for got, want in zip(leaves, ref):
        assert got.grad.is_contiguous()
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=5e-2 if dtype != torch.float32 else 1e-3,
                                   atol=5e-2 if dtype != torch.float32 else 1e-3)


def test_ffn_padded_takes_the_fused_path_and_matches_the_unfused_one():
    e, C, D, H = 8, 64, 128, 256
    x, w1, b1 = operands(e, C, D, H, torch.bfloat16, True, seed=2)
    w2 = torch.randn(e, H, D, device=DEV, dtype=torch.bfloat16) / H ** 0.5
    w = FFNWeights(w1, w2, b1, None)
    with torch.no_grad():
        fused = ffn_padded(x, w, F.relu)
        unfused = ffn_padded(x, w, lambda t: torch.relu(t))   # not identified: the unfused path
    torch.testing.assert_close(fused, unfused, **tol(torch.bfloat16))


def test_cuda_graph_capture_and_replay():
    x, w, b = operands(4, 32, 64, 64, torch.bfloat16, True, seed=3)
    with torch.no_grad():
        fused_fc1(x, w, b, F.relu)                     # algorithm chosen outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            out = fused_fc1(x, w, b, F.relu)
        torch.cuda.current_stream().wait_stream(stream)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(out.double(), reference(x, w, b), **tol(torch.bfloat16))


def test_refusals_name_the_reason():
    x, w, b = operands(2, 8, 16, 16, torch.bfloat16, True)
    assert "relu" in fused_fc1_blocker(x, w, b, F.gelu)
    assert "dtype" in fused_fc1_blocker(x, w.float(), None, F.relu)
    assert "contiguous" in fused_fc1_blocker(x.transpose(1, 2).contiguous().transpose(1, 2), w, None, F.relu)
    x_odd, w_odd, _ = operands(2, 8, 12, 16, torch.bfloat16, False)
    assert "multiples of 8" in fused_fc1_blocker(x_odd, w_odd, None, F.relu)
    assert fused_fc1(x, w, b, F.gelu) is None
    assert "CUDA" in fused_fc1_blocker(x.cpu(), w.cpu(), None, F.relu)


def test_native_rejects_bad_inputs_with_named_arguments():
    native = _fused_gemm._native.load()
    x, w, b = operands(2, 8, 16, 16, torch.bfloat16, True)
    with pytest.raises(RuntimeError, match="act must be"):
        native.bmm_nt_act(x, w, b, 7, False)
    with pytest.raises(RuntimeError, match="w must be"):
        native.bmm_nt_act(x, w[:, :, :8].contiguous(), None, 1, False)
    with pytest.raises(RuntimeError, match="bias"):
        native.bmm_nt_act(x, w, b[:, :8].contiguous(), 1, False)
