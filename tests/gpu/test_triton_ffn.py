"""The Triton grouped GEMMs (adaptmoe.ops._triton_gemm) and the dropless relu FFN built on them
(adaptmoe.ops._triton_ffn) against float64 per-expert references, on poisoned output memory, with
experts that get no rows; and the layer's dropless training step through them (eager and replayed
from CUDA graphs)."""
import copy

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import adaptmoe as am  # noqa: E402
from adaptmoe.ops import _triton_ffn  # noqa: E402
from adaptmoe.ops import _triton_slotted  # noqa: E402
from adaptmoe.ops import _triton_gemm as tg  # noqa: E402
from gpu_bf16 import assert_close_rel, rand, skip_unless_triton_kernels  # noqa: E402
from gpu_poison import poison  # noqa: E402

skip_unless_triton_kernels()

DEV = "cuda"
COUNTS = [0, 130, 1, 0, 200, 69, 257, 0]   # zero-row experts, partial and several-tile experts


@pytest.fixture
def triton_ffn_on():
    """The Triton training FFN is opt-in (measured slower than grouped_mm end to end); the slot
    path, which would serve bias-free dropless training calls first, is off meanwhile."""
    _triton_ffn.set_enabled(True)
    _triton_slotted.set_enabled(False)
    yield
    _triton_ffn.set_enabled(False)
    _triton_slotted.set_enabled(True)


def per_expert(fn, counts):
    """fn(e, row slice) for every expert, in grouped row order."""
    start, out = 0, []
    for e, n in enumerate(counts):
        out.append(fn(e, slice(start, start + n)))
        start += n
    return out


@pytest.mark.parametrize("sums", [(False, False), (True, False), (False, True)])
def test_ragged_k_mm_vs_per_expert_matmul(sums):
    torch.manual_seed(0)
    counts = torch.tensor(COUNTS, device=DEV)
    R, P, Q = sum(COUNTS), 256, 384
    a, b = rand(R, P), rand(R, Q)
    poison(32 << 20)   # 64 MiB of NaN bytes
    c, sum_a, sum_b = tg.ragged_k_mm(a, b, counts, sum_a=sums[0], sum_b=sums[1])
    want = torch.stack(per_expert(lambda e, s: a[s].double().t() @ b[s].double(), COUNTS))
    assert_close_rel(c, want)
    assert torch.all(c[counts == 0] == 0)   # no rows: a zero gradient, not garbage
    if sums[0]:
        assert_close_rel(sum_a, torch.stack(per_expert(lambda e, s: a[s].double().sum(0), COUNTS)), 1e-5)
    if sums[1]:
        assert_close_rel(sum_b, torch.stack(per_expert(lambda e, s: b[s].double().sum(0), COUNTS)), 1e-5)
    assert (sum_a is None) != sums[0] and (sum_b is None) != sums[1]


@pytest.mark.parametrize("transpose_b", [True, False])
@pytest.mark.parametrize("epilogue", [tg.EPILOGUE_NONE, tg.EPILOGUE_RELU, tg.EPILOGUE_RELU_GRAD])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_rows_mm_layouts_and_epilogues(transpose_b, epilogue, bias):
    torch.manual_seed(1)
    E, KD, N = len(COUNTS), 192, 256
    counts = torch.tensor(COUNTS, device=DEV)
    R = sum(COUNTS)
    a = rand(R, KD)
    b = rand(E, N, KD, scale=KD ** -0.5) if transpose_b else rand(E, KD, N, scale=KD ** -0.5)
    bias_EN = rand(E, N) if bias else None
    relu_out = torch.relu(rand(R, N)) if epilogue == tg.EPILOGUE_RELU_GRAD else None
    poison(32 << 20)   # 64 MiB of NaN bytes
    c = tg.grouped_rows_mm(a, counts, b, transpose_b, bias_EN=bias_EN, epilogue=epilogue, relu_out=relu_out)

    def reference(e, s):
        out = a[s].double() @ (b[e].double().t() if transpose_b else b[e].double())
        return out + bias_EN[e].double() if bias else out
    want = torch.cat(per_expert(reference, COUNTS))
    if epilogue == tg.EPILOGUE_RELU:
        want = want.clamp_min(0)
    elif epilogue == tg.EPILOGUE_RELU_GRAD:
        want = torch.where(relu_out > 0, want, 0.0)
    assert_close_rel(c, want)


def ffn_reference(x, counts, w1, b1, w2, b2):
    """float64 per-expert relu FFN (differentiable)."""
    def expert(e, s):
        h = torch.relu(x[s] @ w1[e].t() + (0 if b1 is None else b1[e]))
        return h @ w2[e] + (0 if b2 is None else b2[e])
    return torch.cat(per_expert(expert, counts))


@pytest.mark.parametrize("biases, kernels", [
    (False, _triton_ffn.FFNKernels("triton", "triton")),
    (False, _triton_ffn.FFNKernels("grouped_mm", "grouped_mm")),
    (False, _triton_ffn.FFNKernels("triton", "grouped_mm")),
    (True, _triton_ffn.FFNKernels("grouped_mm", "grouped_mm")),   # biases: Triton for what needs them
], ids=["triton", "grouped_mm", "mixed", "biases"])
def test_relu_ffn_output_and_gradients_vs_float64(biases, kernels, triton_ffn_on):
    torch.manual_seed(2)
    E, D, H = len(COUNTS), 128, 256
    R = sum(COUNTS)
    tensors = [rand(R, D), rand(E, H, D, scale=D ** -0.5), rand(E, H) if biases else None,
               rand(E, H, D, scale=H ** -0.5), rand(E, D) if biases else None]
    leaves = [t.requires_grad_() if t is not None else None for t in tensors]
    counts = torch.tensor(COUNTS, device=DEV)
    assert _triton_ffn.blocker(leaves[0], leaves[1], leaves[3], (leaves[2], leaves[4]), True, False) is None
    gy = rand(R, D)
    poison(32 << 20)   # 64 MiB of NaN bytes
    y = _triton_ffn.relu_ffn(leaves[0], counts, *leaves[1:], kernels=kernels)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, present, gy)
    ref_leaves = [None if t is None else t.detach().double().requires_grad_() for t in leaves]
    y_ref = ffn_reference(ref_leaves[0], COUNTS, *ref_leaves[1:])
    grads_ref = torch.autograd.grad(y_ref, [t for t in ref_leaves if t is not None], gy.double())
    assert_close_rel(y, y_ref)
    for got, want in zip(grads, grads_ref):
        assert got.dtype == torch.bfloat16
        assert_close_rel(got, want)


def dropless_layer(bias: bool):
    torch.manual_seed(3)
    cfg = am.MoEConfig(model_dim=128, num_experts=8, gate=am.GateConfig(top_k=2, capacity_factor=0.0),
                       experts=am.ExpertConfig(hidden_size=256, has_fc1_bias=bias, has_fc2_bias=bias))
    return am.MoELayer(cfg).to(DEV)


def layer_step(layer, x, g):
    xi = x.clone().requires_grad_(True)
    y = layer(xi)
    params = list(layer.parameters())
    grads = torch.autograd.grad([y, y.l_aux], [xi, *params], [g, torch.ones_like(y.l_aux)])
    return y.detach(), grads


@pytest.mark.parametrize("bias", [False, True])
def test_dropless_training_layer_runs_triton_and_matches_float64(bias, monkeypatch, triton_ffn_on):
    """A bf16 dropless training step takes the Triton FFN (counted) and gives the output and
    gradients of the same layer in float64 (same weight values, same inputs). The grouped_mm
    path (Triton off) is compared on outputs only: with biases it rounds x w1^T to bf16 before
    adding b1, so a pre-activation within one rounding of 0 may fall on the other side of relu's
    kink and move a whole weight-gradient row (seen on the H100: 96 of 262144 elements)."""
    layer = dropless_layer(bias).to(torch.bfloat16)
    E = layer.config.num_experts
    with torch.no_grad():   # logits = x[:, :E], exact in bf16: both dtypes route alike
        layer.gates[0].wg.weight.zero_()
        layer.gates[0].wg.weight[:, :E] = torch.eye(E)
    layer64 = copy.deepcopy(layer).double()
    x = torch.randn(200, 128, device=DEV)
    x[:, :E] = (torch.argsort(torch.rand(200, E, device=DEV), dim=1) + 1) * 0.25   # no ties
    x = x.bfloat16()
    g = torch.randn(200, 128, device=DEV).bfloat16()
    calls = []
    real = _triton_ffn.relu_ffn
    monkeypatch.setattr(_triton_ffn, "relu_ffn", lambda *a: calls.append(1) or real(*a))
    y, grads = layer_step(layer, x, g)
    assert calls, "the dropless bf16 training step did not take the Triton FFN"
    y64, grads64 = layer_step(layer64, x.double(), g.double())
    _triton_ffn.set_enabled(False)
    y_gmm = layer(x).detach()   # parameters require grad: the training path, now on grouped_mm
    assert len(calls) == 1
    assert_close_rel(y, y64)
    assert_close_rel(y_gmm, y64)
    names = ["x", *(name for name, _ in layer.named_parameters())]
    for name, got, want in zip(names, grads, grads64):
        assert_close_rel(got, want, 3e-2, f"grad of {name}")


def test_dropless_training_step_replays_from_cuda_graphs(triton_ffn_on):
    """make_graphed_callables over the bf16 dropless layer (the Triton FFN inside the captured
    forward and backward): the same output and gradients as eager steps, for fresh inputs."""
    layer = dropless_layer(True).to(torch.bfloat16)
    x = torch.randn(200, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    graphed = torch.cuda.make_graphed_callables(layer, (x,))
    params = list(layer.parameters())
    for _ in range(2):
        x_new, g = torch.randn_like(x), torch.randn_like(x)
        results = []
        for fn in (graphed, layer):
            xi = x_new.detach().clone().requires_grad_(True)
            grads = torch.autograd.grad(fn(xi), [xi, *params], g)
            results.append([t.clone() for t in grads])
        for replayed, eager in zip(*results):
            torch.testing.assert_close(replayed, eager, rtol=0, atol=0)   # same kernels, same inputs
