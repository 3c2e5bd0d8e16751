"""The capacity-padded relu FFN with relu in cuBLASLt's epilogue (native bmm_nt_act) against a
float64 reference, forward and (training) gradients, graph capture, and the inputs it refuses
(run on the device machine: `pytest -m gpu tests/gpu`).

Legend: e experts, C rows per expert, D model dim, H hidden, O output dim.
"""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs CUDA", allow_module_level=True)

from adaptmoe.expert_compute import FFNWeights, ffn_padded  # noqa: E402
from adaptmoe.ops import _fused_gemm  # noqa: E402
from adaptmoe.ops._fused_gemm import TOLERANCES, fc1_relu, fused_ffn_blocker, fused_relu_ffn  # noqa: E402
from gpu_poison import poison  # noqa: E402

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 1, 8, 8), (1, 5, 16, 24), (4, 37, 64, 128), (8, 256, 2048, 1024), (3, 0, 32, 16)]  # e, C, D, H


def tol(dtype, scale=1.0):
    rtol, atol = TOLERANCES[dtype]
    return dict(rtol=rtol * scale, atol=atol * scale)


def operands(e, C, D, H, dtype, bias, seed=0):
    """x, w1, b1, w2 scaled so that h and y are O(1)."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(e, C, D, generator=g, device=DEV).div_(D ** 0.5).to(dtype)
    w1 = torch.randn(e, H, D, generator=g, device=DEV).to(dtype)
    b1 = torch.randn(e, H, generator=g, device=DEV).to(dtype) if bias else None
    w2 = torch.randn(e, H, D, generator=g, device=DEV).div_(H ** 0.5).to(dtype)
    return x, w1, b1, w2


def reference_hidden(x, w1, b1):
    h = torch.bmm(x.double(), w1.double().transpose(1, 2))
    return torch.relu(h if b1 is None else h + b1.double().unsqueeze(1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("e,C,D,H", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_matches_float64(e, C, D, H, dtype, bias):
    x, w1, b1, w2 = operands(e, C, D, H, dtype, bias)
    assert fused_ffn_blocker(x, w1, b1, w2, F.relu) is None
    poison(e * C * H * x.element_size())
    with torch.no_grad():
        h = fc1_relu(x, w1, b1)
        y = fused_relu_ffn(x, w1, b1, w2, F.relu)
    want_h = reference_hidden(x, w1, b1)
    assert h.shape == (e, C, H) and h.dtype == dtype and y.shape == (e, C, D)
    torch.testing.assert_close(h.double(), want_h, **tol(dtype))
    # y's reference starts from the rounded h the kernel produced (one more rounding in bmm)
    torch.testing.assert_close(y.double(), torch.bmm(h.double(), w2.double()), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("e,C,D,H", [(1, 5, 16, 24), (4, 37, 64, 128), (8, 256, 512, 1024), (3, 0, 32, 16)])
def test_training_gradients_match_float64_and_the_unfused_path(e, C, D, H, dtype, bias, monkeypatch):
    """Calls that need a gradient take the fused first GEMM (autograd nodes of their own): output
    and the gradients of x, w1, b1 and w2 against float64 arithmetic on the same hidden activation
    (its relu pattern is the kernel's: a pre-activation within a rounding of 0 may fall either
    way), and, without bias, against the unfused path in the same dtype (with a bias the unfused
    path rounds x w1^T before adding it, so its relu pattern may differ near 0)."""
    calls = []
    real_fc1_relu = _fused_gemm.fc1_relu
    monkeypatch.setattr(_fused_gemm, "fc1_relu", lambda *args: calls.append(1) or real_fc1_relu(*args))
    monkeypatch.setattr(_fused_gemm, "MIN_TRAINING_HIDDEN", 0)   # test shapes are small
    x, w1, b1, w2 = operands(e, C, D, H, dtype, bias, seed=4)
    leaves = [t.requires_grad_(True) for t in (x, w1, b1, w2) if t is not None]
    g = torch.randn(e, C, D, device=DEV, dtype=dtype)

    def run(fused: bool):
        _fused_gemm.set_enabled(fused)
        try:
            y = ffn_padded(x, FFNWeights(w1, w2, b1, None), F.relu)
        finally:
            _fused_gemm.set_enabled(True)
        return [y.detach()] + list(torch.autograd.grad(y, leaves, g))

    fused = run(True)
    assert calls == [1], "the training call did not take the fused GEMM"
    with torch.no_grad():
        h = real_fc1_relu(x, w1, b1).double()   # the same kernel: the same hidden activation
    g64, x64, w1_64, w2_64 = g.double(), x.detach().double(), w1.detach().double(), w2.detach().double()
    gh = torch.bmm(g64, w2_64.transpose(1, 2)) * (h > 0)
    want = [torch.bmm(h, w2_64), torch.bmm(gh, w1_64), torch.bmm(gh.transpose(1, 2), x64)]
    want += [gh.sum(1)] if bias else []
    want += [torch.bmm(h.transpose(1, 2), g64)]
    rtol, atol = TOLERANCES[dtype]
    for got, ref in zip(fused, want):
        scale = max(1.0, ref.abs().max().item()) if ref.numel() else 1.0
        torch.testing.assert_close(got.double(), ref, rtol=2 * rtol, atol=2 * atol * scale)
    if not bias:
        for got, same_dtype in zip(fused, run(False)):
            scale = max(1.0, same_dtype.abs().max().item()) if same_dtype.numel() else 1.0
            torch.testing.assert_close(got, same_dtype, rtol=2 * rtol, atol=2 * atol * scale)


def test_small_training_calls_keep_the_unfused_path(monkeypatch):
    """Below MIN_TRAINING_HIDDEN hidden elements a call that needs a gradient runs bmm, relu, bmm
    (its two autograd nodes would cost more host time than the relu pass); no-grad calls fuse."""
    calls = []
    real_fc1_relu = _fused_gemm.fc1_relu
    monkeypatch.setattr(_fused_gemm, "fc1_relu", lambda *args: calls.append(1) or real_fc1_relu(*args))
    x, w1, b1, w2 = operands(4, 40, 64, 96, torch.bfloat16, True, seed=1)
    w1.requires_grad_(True)
    monkeypatch.setattr(_fused_gemm, "MIN_TRAINING_HIDDEN", 4 * 40 * 96 + 1)
    assert fused_relu_ffn(x, w1, b1, w2, F.relu) is None and calls == []
    monkeypatch.setattr(_fused_gemm, "MIN_TRAINING_HIDDEN", 4 * 40 * 96)
    assert fused_relu_ffn(x, w1, b1, w2, F.relu) is not None and calls == [1]
    with torch.no_grad():
        monkeypatch.setattr(_fused_gemm, "MIN_TRAINING_HIDDEN", 1 << 40)
        assert fused_relu_ffn(x, w1, b1, w2, F.relu) is not None and calls == [1, 1]


def test_ffn_padded_takes_the_fused_path_and_matches_the_unfused_one(monkeypatch):
    x, w1, b1, w2 = operands(8, 64, 128, 256, torch.bfloat16, True, seed=2)
    b2 = torch.randn(8, 128, device=DEV, dtype=torch.bfloat16)
    w = FFNWeights(w1, w2, b1, b2)
    calls = []
    real_fc1_relu = _fused_gemm.fc1_relu
    monkeypatch.setattr(_fused_gemm, "fc1_relu", lambda *args: calls.append(1) or real_fc1_relu(*args))
    with torch.no_grad():
        fused = ffn_padded(x, w, F.relu)
        assert calls == [1], "ffn_padded did not take the fused GEMM"
        _fused_gemm.set_enabled(False)
        try:
            assert "turned off" in fused_ffn_blocker(x, w1, b1, w2, F.relu)
            unfused = ffn_padded(x, w, F.relu)
        finally:
            _fused_gemm.set_enabled(True)
        assert calls == [1], "the switch did not turn the fused GEMM off"
    torch.testing.assert_close(fused, unfused, **tol(torch.bfloat16, 2.0))


def test_cuda_graph_capture_and_replay():
    x, w1, b1, w2 = operands(4, 32, 64, 64, torch.bfloat16, True, seed=3)
    with torch.no_grad():
        fused_relu_ffn(x, w1, b1, w2, F.relu)          # algorithm chosen outside the capture
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(stream), torch.cuda.graph(graph):
            h = fc1_relu(x, w1, b1)
        torch.cuda.current_stream().wait_stream(stream)
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
    torch.testing.assert_close(h.double(), reference_hidden(x, w1, b1), **tol(torch.bfloat16))


def test_refusals_name_the_reason():
    x, w1, b1, w2 = operands(2, 8, 16, 16, torch.bfloat16, True)
    assert "relu" in fused_ffn_blocker(x, w1, b1, w2, F.gelu)
    assert "dtype" in fused_ffn_blocker(x, w1.float(), None, w2, F.relu)
    assert "contiguous" in fused_ffn_blocker(x.transpose(1, 2).contiguous().transpose(1, 2), w1, None, w2, F.relu)
    x_odd, w1_odd, _, w2_odd = operands(2, 8, 12, 16, torch.bfloat16, False)
    assert "multiples of 8" in fused_ffn_blocker(x_odd, w1_odd, None, w2_odd, F.relu)
    assert fused_relu_ffn(x, w1, b1, w2, F.gelu) is None
    assert "CUDA" in fused_ffn_blocker(x.cpu(), w1.cpu(), None, w2.cpu(), F.relu)


def test_native_rejects_bad_inputs_with_named_arguments():
    native = _fused_gemm._native.load()
    x, w1, b1, _ = operands(2, 8, 16, 16, torch.bfloat16, True)
    with pytest.raises(RuntimeError, match="act must be"):
        native.bmm_nt_act(x, w1, b1, 7, False)
    with pytest.raises(RuntimeError, match="w must be"):
        native.bmm_nt_act(x, w1[:, :, :8].contiguous(), None, 1, False)
    with pytest.raises(RuntimeError, match="bias"):
        native.bmm_nt_act(x, w1, b1[:, :8].contiguous(), 1, False)
