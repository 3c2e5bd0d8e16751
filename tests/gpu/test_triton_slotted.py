"""Dropless training in capacity slots (adaptmoe.ops._triton_slotted): the fix-up kernels on
poisoned memory, the layer's training step against the same layer in float64 on routings with no,
some and extreme overflow (relu experts with the relu in the first GEMMs' epilogues, gated silu
without), the switch to grouped_mm after heavy overflow, and CUDA-graph replay."""
import copy

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import adaptmoe as am  # noqa: E402
from adaptmoe.ops import _fused_gemm, _triton_slotted  # noqa: E402
from adaptmoe.ops import _triton_gemm as tg  # noqa: E402
from gpu_bf16 import assert_close_rel, rand, skip_unless_triton_kernels  # noqa: E402
from gpu_poison import poison  # noqa: E402
from native_calls import served_natively  # noqa: E402

skip_unless_triton_kernels()

DEV = "cuda"


@pytest.fixture(autouse=True)
def small_layers_take_slots(monkeypatch):
    """The test layers are far below the work the path needs to repay its host time (and far
    below the hidden size from which relu layers fuse the relu into the first GEMMs)."""
    monkeypatch.setattr(_triton_slotted, "MIN_GEMM_WORK", 0)
    monkeypatch.setattr(_fused_gemm, "MIN_TRAINING_HIDDEN", 0)


def test_scattered_rows_and_weight_gradient_moves_touch_only_their_rows():
    torch.manual_seed(0)
    S, E, KD, N = 640, 6, 256, 384
    remove = torch.tensor([0, 0, 70, 64, 0, 0], device=DEV)   # the same 134 rows, grouped by two owners...
    add = torch.tensor([3, 130, 0, 0, 1, 0], device=DEV)      # ... and by three others; expert 5: neither
    rows = torch.randperm(S, device=DEV)[:134].sort().values
    a, w = rand(S, KD), rand(E, N, KD, scale=KD ** -0.5)
    poison(32 << 20)
    out = rand(S, N)
    before = out.clone()
    tg.grouped_rows_mm(a, add, w, True, gather_R=torch.cat([rows, rows[:5]]), top_k=1, out=out)
    adder = torch.repeat_interleave(torch.arange(E, device=DEV), add)
    assert_close_rel(out[rows], torch.einsum("rk,rnk->rn", a[rows].double(), w[adder].double()))
    untouched = torch.ones(S, dtype=torch.bool, device=DEV)
    untouched[rows] = False
    assert torch.equal(out[untouched], before[untouched])

    b = rand(S, N)
    g = rand(E, KD, N)
    want = g.double()
    remover = torch.repeat_interleave(torch.arange(E, device=DEV), remove)
    for r, e_from, e_to in zip(rows.tolist(), remover.tolist(), adder.tolist()):
        outer = a[r].double().unsqueeze(1) * b[r].double().unsqueeze(0)
        want[e_from] -= outer
        want[e_to] += outer
    g_before = g.clone()
    tg.ragged_k_move(g, a, b, rows, remove, add)
    assert torch.equal(g[5], g_before[5])   # neither loses nor gains rows: not rewritten
    for e in range(E - 1):
        assert_close_rel(g[e], want[e], what=f"expert {e}")
    with pytest.raises(ValueError, match="multiples of 128"):
        tg.ragged_k_move(g[:, :, :100], a, b[:, :100], rows, remove, add)


def layer(gated: bool, E: int = 8, k: int = 2):
    torch.manual_seed(3)
    cfg = am.MoEConfig(model_dim=128, num_experts=E, gate=am.GateConfig(top_k=k, capacity_factor=0.0),
                       experts=am.ExpertConfig(kind="gated_ffn" if gated else "ffn", hidden_size=256,
                                               activation="silu" if gated else "relu",
                                               has_fc1_bias=False, has_fc2_bias=False))
    lay = am.MoELayer(cfg).to(DEV).to(torch.bfloat16)
    with torch.no_grad():   # logits = x[:, :E], exact in bf16: both dtypes route alike
        lay.gates[0].wg.weight.zero_()
        lay.gates[0].wg.weight[:, :E] = torch.eye(E)
    return lay


def routed_input(T: int, E: int, skew: float):
    """Tokens whose logits are x[:, :E] (distinct, no ties), tilted towards low experts by ``skew``."""
    x = torch.randn(T, 128, device=DEV)
    x[:, :E] = (torch.argsort(torch.rand(T, E, device=DEV), dim=1) + 1) * 0.25
    x[:, :E] += skew * torch.linspace(1, 0, E, device=DEV)
    return x.bfloat16()


def balanced_input(T: int, E: int, k: int):
    """Token t's top-k are experts (t*k + j) mod E: every expert gets exactly T*k/E rows."""
    x = routed_input(T, E, 0.0).float()
    chosen = (torch.arange(T, device=DEV).unsqueeze(1) * k + torch.arange(k, device=DEV)) % E
    x[:, :E].scatter_add_(1, chosen, torch.full((T, k), 10.0, device=DEV))
    return x.bfloat16()


def step(lay, x, g):
    xi = x.clone().requires_grad_(True)
    y = lay(xi)
    grads = torch.autograd.grad([y, y.l_aux], [xi, *lay.parameters()], [g, torch.ones_like(y.l_aux)])
    return y.detach(), grads


def spy(monkeypatch):
    """The keyword arguments of each slotted_bmm call (relu=True: relu in the GEMM's epilogue)."""
    calls = []
    real = _triton_slotted.slotted_bmm
    monkeypatch.setattr(_triton_slotted, "slotted_bmm", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("T, skew", [(256, 0.0), (200, 1.0), (200, 100.0), (1, 0.0), (3, 100.0)],
                         ids=["balanced-ish", "skewed", "all-to-two-experts", "one-token", "three-tokens"])
@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated-silu"])
def test_slotted_training_step_matches_float64(T, skew, gated, monkeypatch):
    lay = layer(gated)
    lay64 = copy.deepcopy(lay).double()
    x, g = routed_input(T, 8, skew), torch.randn(T, 128, device=DEV).bfloat16()
    calls = spy(monkeypatch)
    poison(32 << 20)
    y, grads = step(lay, x, g)
    assert calls, "the bf16 dropless training step did not take the slot path"
    fused = [kw.get("relu", False) for kw in calls]
    assert any(fused) == (not gated), "relu experts fuse the relu into the first GEMMs, gated ones do not"
    y64, grads64 = step(lay64, x.double(), g.double())
    assert_close_rel(y, y64)
    names = ["x", *(name for name, _ in lay.named_parameters())]
    for name, got, want in zip(names, grads, grads64):
        assert_close_rel(got, want, 3e-2, f"grad of {name}")


def test_heavy_overflow_switches_the_next_call_to_grouped_mm_and_back(monkeypatch):
    lay = layer(False)
    g = torch.randn(200, 128, device=DEV).bfloat16()
    calls = spy(monkeypatch)
    skewed, balanced = routed_input(200, 8, 100.0), balanced_input(200, 8, 2)
    step(lay, skewed, g)                 # nothing measured yet: slots
    torch.cuda.synchronize()
    taken = len(calls)
    y, _ = step(lay, skewed, g)          # the last call would fix up every expert: grouped_mm
    assert len(calls) == taken and lay.experts._overflow_monitor.touched_fraction == 1.0
    torch.cuda.synchronize()
    for _ in range(_triton_slotted.REMEASURE_EVERY - 1):   # off slots, the REMEASURE_EVERY-th call
        step(lay, balanced, g)                             # since the switch lays out (measures) its
        torch.cuda.synchronize()                           # routing: the next takes slots again
    assert len(calls) == taken
    step(lay, balanced, g)
    assert len(calls) > taken and lay.experts._overflow_monitor.touched_fraction == 0
    _triton_slotted.set_enabled(False)
    try:
        y_off, _ = step(lay, skewed, g)
    finally:
        _triton_slotted.set_enabled(True)
    torch.testing.assert_close(y, y_off, rtol=0, atol=0)   # both calls on grouped_mm


def test_slotted_training_step_replays_from_cuda_graphs(monkeypatch):
    """Captured with overflow rows, replayed on others; eager calls forced onto slots too (the
    monitor would send a skewed eager call to grouped_mm, which rounds differently)."""
    monkeypatch.setattr(_triton_slotted, "MAX_TOUCHED_FRACTION", 1.0)
    lay = layer(False)
    x = routed_input(200, 8, 1.0).requires_grad_(True)
    calls = spy(monkeypatch)
    graphed = torch.cuda.make_graphed_callables(lay, (x,))
    assert calls
    params = list(lay.parameters())
    for skew in (0.0, 1.0, 100.0):
        x_new, g = routed_input(200, 8, skew), torch.randn(200, 128, device=DEV).bfloat16()
        results = []
        for fn in (graphed, lay):
            xi = x_new.clone().requires_grad_(True)
            grads = torch.autograd.grad(fn(xi), [xi, *params], g)
            results.append([t.clone() for t in grads])
        for replayed, eager in zip(*results):
            torch.testing.assert_close(replayed, eager, rtol=0, atol=0)


@pytest.mark.parametrize("skew", [0.0, 1.0, 100.0], ids=["balanced-ish", "skewed", "all-to-two-experts"])
@pytest.mark.parametrize("gated", [False, True], ids=["relu", "gated-silu"])
def test_native_slotted_gemms_match_the_python_steps(gated, skew, monkeypatch):
    """After a first step registered the Triton kernels' variants, every slotted GEMM runs as one
    native call per direction (slotted_bmm_forward / _backward): the same kernels on the same
    inputs as the Python steps, so the same bits, outputs and every gradient."""
    monkeypatch.setattr(_triton_slotted, "MAX_TOUCHED_FRACTION", 1.0)   # skewed calls stay on slots
    monkeypatch.setattr(tg._grouped_rows_launches, "_variants", {})
    monkeypatch.setattr(tg._ragged_k_move_launches, "_variants", {})
    lay = layer(gated)
    x, g = routed_input(200, 8, skew), torch.randn(200, 128, device=DEV).bfloat16()
    step(lay, x, g)   # registers the variants (Python steps)
    served = {name: served_natively(monkeypatch, name) for name in ("slotted_bmm_forward", "slotted_bmm_backward")}
    y, grads = step(lay, x, g)
    assert all(served["slotted_bmm_forward"]) and len(served["slotted_bmm_forward"]) == (3 if gated else 2)
    assert all(served["slotted_bmm_backward"]) and len(served["slotted_bmm_backward"]) == (3 if gated else 2)
    _triton_slotted.set_native_gemms(False)
    try:
        y_py, grads_py = step(lay, x, g)
    finally:
        _triton_slotted.set_native_gemms(True)
    assert torch.equal(y, y_py)
    for got, want in zip(grads, grads_py):
        assert torch.equal(got, want)
