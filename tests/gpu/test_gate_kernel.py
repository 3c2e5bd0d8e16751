"""The gate of few experts (native gate_kernels.cu through ops.gate_logits and the native forwards):
logits against the float64 product, the same bits whatever the batch or x's alignment, F.linear's
bits where the kernel does not serve, and a no-grad layer's Python path routing on the same logits
as its native call."""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import adaptmoe as am  # noqa: E402
from adaptmoe import native_forward, ops  # noqa: E402
from adaptmoe.ops._gate_op import GATE_TOLERANCES  # noqa: E402
from gpu_poison import poison  # noqa: E402

DEV = "cuda"


def check_logits(got, x, w, fp32):
    """got against x @ w^T in float64: GATE_TOLERANCES of the logits' dtype."""
    want = x.double() @ w.double().t()
    scale = x.double().abs() @ w.double().abs().t()
    dtype = torch.float32 if fp32 else w.dtype
    assert got.dtype == dtype and got.shape == want.shape
    rel, acc = GATE_TOLERANCES[dtype]
    err = (got.double() - want).abs()
    bound = rel * want.abs() + acc * scale + 1e-30
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fp32", [False, True])
@pytest.mark.parametrize("T,E,D", [(1, 1, 1), (3, 2, 7), (33, 3, 64), (257, 5, 130), (1000, 8, 1536), (0, 2, 64),
                                   (100, 2, 12288)])
def test_gate_logits_against_float64(T, E, D, fp32, dtype):
    torch.manual_seed(T + E + D)
    x = torch.randn(T, D, device=DEV, dtype=dtype)
    w = torch.randn(E, D, device=DEV, dtype=dtype) / D ** 0.5
    poison(4 * T * E + 64)
    got = ops.gate_logits(x, w, fp32)
    torch.cuda.synchronize()
    check_logits(got, x, w, fp32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gate_logits_bits_do_not_depend_on_batch_or_alignment(dtype):
    torch.manual_seed(0)
    T, E, D = 50, 4, 256
    w = torch.randn(E, D, device=DEV, dtype=dtype)
    flat = torch.randn(T * D + 1, device=DEV, dtype=dtype)
    x_misaligned = flat[1:].view(T, D)   # contiguous, one element off the 16-byte boundary
    x = x_misaligned.clone()
    full = ops.gate_logits(x, w, False)
    assert torch.equal(ops.gate_logits(x_misaligned, w, False), full)
    for t in (0, 1, 17, T - 1):
        assert torch.equal(ops.gate_logits(x[t:t + 1], w, False), full[t:t + 1])
    assert torch.equal(ops.gate_logits(x.t().contiguous().t(), w, False), full)   # strided x


@pytest.mark.parametrize("E,D", [(9, 128), (8, 4096), (2, 12296)])
def test_gate_logits_beyond_the_kernel_are_f_linear(E, D):
    """More experts than the kernel takes, or a weight beyond its shared memory (48 KiB): at::mm,
    F.linear's bits."""
    assert E > ops._native.load().max_gate_experts or E * D * 2 > 48 * 1024
    torch.manual_seed(1)
    x = torch.randn(64, D, device=DEV, dtype=torch.bfloat16)
    w = torch.randn(E, D, device=DEV, dtype=torch.bfloat16)
    assert torch.equal(ops.gate_logits(x, w, False), F.linear(x, w))


def test_gate_logits_with_mixed_dtypes():
    """x in float32, gate weight in bf16: x rounded to bf16 first (the reference), at::mm path."""
    torch.manual_seed(2)
    x = torch.randn(40, 64, device=DEV)
    w = torch.randn(2, 64, device=DEV, dtype=torch.bfloat16)
    torch.testing.assert_close(ops.gate_logits(x, w, False), ops.gate_logits_reference(x, w, False))
    check_logits(ops.gate_logits(x, w, True), x, w, True)


@pytest.mark.parametrize("E,k,gate", [(2, 2, "softmax"), (8, 2, "softmax"), (4, 1, "sigmoid"), (6, 3, "softmax")])
@pytest.mark.parametrize("cf", [1.0, 0.0])
def test_layer_routes_on_the_same_logits_in_both_paths(E, k, gate, cf):
    """Native call (gate fused with its top-k) and Python path (gate_logits, then route_topk):
    the same logits, routing and outputs bit for bit where the expert kernels are the same."""
    torch.manual_seed(E * 10 + k)
    cfg = am.MoEConfig(model_dim=96, num_experts=E, gate=am.GateConfig(kind=gate, top_k=k, capacity_factor=cf),
                       experts=am.ExpertConfig(hidden_size=64))
    layer = am.MoELayer(cfg).to(device=DEV, dtype=torch.bfloat16).eval()
    x = torch.randn(300, 96, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        logits = layer.gates[0](x)
    assert torch.equal(logits, ops.gate_logits(x, layer.gates[0].wg.weight, False))

    def routing(native):
        native_forward.set_enabled(native)
        try:
            with torch.no_grad():
                layer(x)
            return layer.last_routing
        finally:
            native_forward.set_enabled(True)
    got, want = routing(True), routing(False)
    for name in ("indices_TK", "weights_TK", "locations_TK", "counts_E", "slots_TK"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_gate_with_grad_keeps_f_linear_and_its_gradient():
    torch.manual_seed(3)
    gate = am.gates.LinearGate(64, 2, fp32=False).to(DEV, torch.bfloat16)
    x = torch.randn(32, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    logits = gate(x)
    assert logits.grad_fn is not None
    assert torch.equal(logits, F.linear(x, gate.wg.weight))
    logits.float().square().sum().backward()
    assert x.grad is not None and gate.wg.weight.grad is not None


def test_gate_under_autocast_keeps_f_linear():
    """Autocast's dtype rules stay F.linear's: the kernel serves calls outside autocast only."""
    torch.manual_seed(4)
    gate = am.gates.LinearGate(64, 2, fp32=False).to(DEV)
    x = torch.randn(16, 64, device=DEV)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = gate(x)
        want = F.linear(x, gate.wg.weight)
    assert logits.dtype == torch.bfloat16 and torch.equal(logits, want)
