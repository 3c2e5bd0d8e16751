"""Dropless no-grad forwards in cf=1's capacity slots (``native_forward``, slotted plan): the native
slot layout against ``routing.overflow_slots``, the row kernel's indexed scatter, and whole layers
(first GEMM gathering its rows, or over dispatched slots) on balanced, random and one-sided routing
(overflow rows in other experts' slots) against the Python path, the float64 per-token reference
and the grouped layout, launched through Triton's launcher first and from inside the native call
after; CUDA-graph replay."""
import copy

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import adaptmoe as am  # noqa: E402
from adaptmoe import native_forward, ops  # noqa: E402
from adaptmoe.ops import _triton_gemm, _triton_slotted  # noqa: E402
from adaptmoe.routing import Routing, capacity_for, overflow_slots  # noqa: E402
from gpu_bf16 import skip_unless_triton_kernels  # noqa: E402
from gpu_poison import poison  # noqa: E402
from graph_replay import replays_and_eager  # noqa: E402
from native_calls import served_natively  # noqa: E402

from reference import reference_forward  # noqa: E402

skip_unless_triton_kernels()

DEV = "cuda"
E, K, D, H = 16, 4, 128, 256


@pytest.fixture(autouse=True)
def fresh_variants(monkeypatch):
    """Small test shapes take the gathered path; every test starts with no registered variant."""
    monkeypatch.setattr(native_forward, "_GATHER_MIN_ELEMENTS", 0)
    monkeypatch.setattr(_triton_gemm._grouped_rows_launches, "_variants", {})


def slotted_layer(bias: bool, routing: str) -> am.MoELayer:
    """Relu experts, fp32 gate (the float64 reference then picks the same experts). ``routing``:
    'balanced' (gate row e reads feature e only, and ``tokens`` give token t's K choices as the
    K largest of those features: every expert gets T*K/E rows), 'random', or 'one_sided'
    (feature 0 sends every token to experts 0..K-1: those overflow by T - C rows each, into the
    others' free slots)."""
    torch.manual_seed(1)
    experts = am.ExpertConfig(hidden_size=H, activation="relu", has_fc1_bias=bias, has_fc2_bias=False)
    cfg = am.MoEConfig(model_dim=D, num_experts=E, gate=am.GateConfig(top_k=K, capacity_factor=0.0, fp32=True),
                       experts=experts)
    layer = am.MoELayer(cfg).to(device=DEV, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        if routing == "one_sided":
            layer.gates[0].wg.weight[:K, 0] = 10.0
        elif routing == "balanced":
            layer.gates[0].wg.weight.zero_()
            layer.gates[0].wg.weight[:, :E] = torch.eye(E)
    return layer


def tokens(T: int, routing: str) -> torch.Tensor:
    torch.manual_seed(T)
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
    if routing == "one_sided":
        x[:, 0] = 4.0
    elif routing == "balanced":   # token t: experts (t*K + j) % E, logits K - j apart from the rest
        x[:, :E] = 0.0
        choices = (torch.arange(T, device=DEV)[:, None] * K + torch.arange(K, device=DEV)) % E
        x.scatter_(1, choices, (2.0 * (K - torch.arange(K, device=DEV, dtype=torch.float32)) + 2.0)
                   .to(x.dtype).expand(T, K).contiguous())
    return x


def is_slotted(layer, x) -> bool:
    with torch.no_grad():
        plan = native_forward.plan_for(layer, x, layer.resolve_knobs())
    return plan is not None and plan.slotted


def call(layer, x, *, native=True, slotted=True):
    native_forward.set_enabled(native)
    native_forward.set_slotted_enabled(slotted)
    try:
        with torch.no_grad():
            y = layer(x)
        return y, layer.last_routing
    finally:
        native_forward.set_enabled(True)
        native_forward.set_slotted_enabled(True)


def assert_same_routing(a: Routing, b: Routing):
    for name in ("indices_TK", "weights_TK", "locations_TK", "counts_E", "slots_TK"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.capacity, a.num_rows) == (b.capacity, b.num_rows)


@pytest.mark.parametrize("routing", ["balanced", "random", "one_sided"])
@pytest.mark.parametrize("T", [1, 37, 300, 512])
def test_native_layout_matches_overflow_slots(T, routing):
    """moe_route_nograd's slot layout: the slots of routing.overflow_slots for the same routing,
    rows_O and choice_O naming the same overflow rows, over_E, every expert's capacity, and the
    inverse over the slots (choice of each fed slot; 0 elsewhere)."""
    layer = slotted_layer(False, routing)
    x = tokens(T, routing)
    gate = layer.gates[0]
    C = capacity_for(1.0, T, E, K)
    out = ops._native.load().moe_route_nograd(x, gate.wg.weight, True, K, 0, True, -1, C)
    indices, weights, _, locations, counts, grouped_slots, inv_S, slots, rows_O, choice_O, over_E, capacity_E = out[1:]
    want = overflow_slots(Routing(indices, weights, locations, counts, None, grouped_slots, T * K), C)
    assert torch.equal(slots, want.slots_TK) and torch.equal(over_E, want.over_E)
    n_over = int(over_E.sum())
    if routing == "one_sided" and T > C:
        assert n_over == K * (T - C) > 0
    assert torch.equal(rows_O[:n_over], want.rows_O[:n_over])
    assert torch.equal(slots.view(-1)[choice_O[:n_over]], rows_O[:n_over])
    assert torch.equal(capacity_E, torch.full_like(capacity_E, C))
    choices = torch.arange(T * K, device=DEV, dtype=torch.int32)
    assert torch.equal(inv_S[slots.view(-1)], choices)
    fed = torch.zeros(E * C, dtype=torch.bool, device=DEV)
    fed[slots.view(-1)] = True
    assert int(inv_S[~fed].abs().sum()) == 0


def test_training_layout_matches_overflow_slots():
    """ops._triton_slotted.layout_on_gpu (the native kernel's training outputs: slots, rows_O,
    over_E, hosted_E, touched, and the count it writes into an overflow monitor's pinned memory)
    against routing.overflow_slots and touched_experts on tilted random routings: no overflow,
    some, experts without rows, E*C == T*K."""
    from adaptmoe.ops._triton_slotted import OverflowMonitor, layout_on_gpu, touched_experts
    from adaptmoe.routing import build_routing
    g = torch.Generator().manual_seed(0)
    monitor = OverflowMonitor()
    for _ in range(30):
        T, E = int(torch.randint(1, 300, (), generator=g)), int(torch.randint(1, 40, (), generator=g))
        k = int(torch.randint(1, min(E, 8) + 1, (), generator=g))
        tilt = torch.linspace(0, float(torch.rand((), generator=g)) * 6, E)
        idx = (torch.randn(T, E, generator=g) + tilt).topk(k, dim=1).indices.to(DEV)
        routing = build_routing(idx, torch.ones(T, k, device=DEV), E, 0.0)
        C = capacity_for(1.0, T, E, k)
        want, (got, touched) = overflow_slots(routing, C), layout_on_gpu(routing, C, monitor)
        n = int(want.over_E.sum())
        assert torch.equal(got.slots_TK, want.slots_TK) and torch.equal(got.rows_O[:n], want.rows_O[:n])
        assert torch.equal(got.over_E, want.over_E) and torch.equal(got.hosted_E, want.hosted_E)
        assert got.capacity == C and int(touched) == int(touched_experts(routing.counts_E, C))
        torch.cuda.synchronize()   # the kernel wrote the count into the monitor's pinned memory too
        assert monitor.prefer_slots(E) == (int(touched) <= E * _triton_slotted.MAX_TOUCHED_FRACTION)
        assert monitor.touched_fraction == int(touched) / E


def test_layout_of_counts_that_do_not_fit_the_routing_writes_no_slot_out_of_range():
    """overflow_layout on inconsistent inputs (counts not from these choices): every choice whose
    expert or location the counts do not cover, or that finds no free slot, gets slot -1."""
    T = 64
    C = capacity_for(1.0, T, E, K)
    idx = torch.randint(0, E, (T, K), device=DEV)
    loc = torch.arange(T * K, device=DEV).view(T, K)
    native = ops._native.load()
    zero = torch.zeros(E, dtype=torch.long, device=DEV)
    slots = native.overflow_layout(idx, loc, zero, C, None)[0]
    assert bool((slots == -1).all())
    many = torch.full((E,), 100, dtype=torch.long, device=DEV)   # 1600 rows for E*C = 256 slots
    slots = native.overflow_layout(idx, loc % 100, many, C, None)[0]
    torch.cuda.synchronize()
    assert bool(((slots == -1) | ((slots >= 0) & (slots < E * C))).all())
    assert bool((slots[(loc % 100) < C] >= 0).all()) and bool((slots[(loc % 100) >= C] == -1).all())


def test_row_kernel_scatters_to_indexed_rows():
    """grouped_rows_mm with scatter_R: row g (gathered from token choice_O[g] // K, grouped by
    expert) goes to out[scatter_R[g]] with relu and bias; every other row of out keeps its value."""
    torch.manual_seed(0)
    T, S = 100, 640
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
    w1 = torch.randn(E, H, D, device=DEV, dtype=torch.bfloat16) / D ** 0.5
    b1 = torch.randn(E, H, device=DEV, dtype=torch.bfloat16)
    counts = torch.zeros(E, dtype=torch.long, device=DEV)
    counts[[1, 4, 5, 15]] = torch.tensor([130, 1, 69, 40], device=DEV)
    n = int(counts.sum())
    choice = torch.randint(0, T * K, (n + 7,), device=DEV)          # longer than the rows: tail unused
    scatter = torch.randperm(S, device=DEV)[:n + 7]
    out = torch.full((S, H), 7.0, device=DEV, dtype=torch.bfloat16)
    _triton_gemm.grouped_rows_mm(x, counts, w1, True, bias_EN=b1, gather_R=choice, top_k=K,
                                 epilogue=_triton_gemm.EPILOGUE_RELU, out=out, scatter_R=scatter)
    expert = torch.repeat_interleave(torch.arange(E, device=DEV), counts)
    rows = x.float()[choice[:n] // K]
    want = torch.relu(torch.einsum("rd,rhd->rh", rows, w1.float()[expert]) + b1.float()[expert])
    rtol, atol = _triton_gemm.TOLERANCE
    torch.testing.assert_close(out[scatter[:n]].float(), want, rtol=rtol, atol=atol)
    untouched = torch.ones(S, dtype=torch.bool, device=DEV)
    untouched[scatter[:n]] = False
    assert bool((out[untouched] == 7.0).all())
    with pytest.raises(ValueError, match="scatter_R needs out="):
        _triton_gemm.grouped_rows_mm(x, counts, w1, True, gather_R=choice, top_k=K, scatter_R=scatter)


FIRST_GEMMS = {"gathered": "moe_forward_nograd_gathered", "dispatched": "moe_forward_nograd_slotted"}


@pytest.mark.parametrize("first_gemm", list(FIRST_GEMMS))
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("routing,T", [("balanced", 512), ("random", 300), ("one_sided", 300), ("random", 1),
                                       ("one_sided", 37)])
def test_slotted_forward_matches_python_path_reference_and_grouped(routing, T, bias, first_gemm, monkeypatch):
    """The first GEMM gathering the slots' tokens (Triton) or over dispatched slots (cuBLAS, as
    experts too large for the gathered GEMM run), slots kept whatever the overflow (the monitor's
    choice is the last test's). Launched through Triton's launcher first
    (variants registered), from inside the native call after: the dropless routing of the Python
    path, outputs within a rounding of it, of the grouped layout and of the float64 reference;
    output memory poisoned before each call."""
    monkeypatch.setattr(native_forward, "_gathered_enabled", first_gemm == "gathered")
    monkeypatch.setattr(native_forward, "MAX_FIXUP_SHARE", float("inf"))   # slots whatever the overflow
    layer = slotted_layer(bias, routing)
    x = tokens(T, routing)
    assert is_slotted(layer, x)
    served = served_natively(monkeypatch, FIRST_GEMMS[first_gemm])
    y_py, routing_py = call(layer, x, native=False)
    y_grouped, _ = call(layer, x, slotted=False)
    if routing == "one_sided" and T > K * -(-T // E):
        assert int(routing_py.counts_E[:K].min()) == T   # every token's K choices: experts 0..K-1
    if routing == "balanced":
        assert bool((routing_py.counts_E == T * K // E).all())
    scale = max(1.0, y_py.abs().max().item())
    for launch in ("triton", "native"):
        poison(1 << 22)
        y, routed = call(layer, x)
        assert_same_routing(routed, routing_py)
        torch.testing.assert_close(y, y_py, rtol=2e-2, atol=2e-2 * scale, msg=launch)
        torch.testing.assert_close(y, y_grouped, rtol=2e-2, atol=2e-2 * scale, msg=launch)
    assert served[-1], "the second slotted call was not served from inside the native call"
    want = reference_forward(copy.deepcopy(layer).cpu(), x.cpu()).to(DEV)
    torch.testing.assert_close(y.double(), want, rtol=6e-2, atol=6e-2 * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("first_gemm", list(FIRST_GEMMS))
def test_slotted_forward_replays_from_a_cuda_graph(first_gemm, monkeypatch):
    """The slotted path reads its counts on the device only: captured (its Triton kernels launched
    from inside the native call), replayed on new tokens, equal to eager calls."""
    monkeypatch.setattr(native_forward, "_gathered_enabled", first_gemm == "gathered")
    monkeypatch.setattr(native_forward, "MAX_FIXUP_SHARE", float("inf"))   # slots whatever the overflow
    layer = slotted_layer(True, "random")
    x = tokens(300, "random")
    assert is_slotted(layer, x)
    with torch.no_grad():
        layer(x)   # registers the variants: the capture launches them natively
    for out, y in replays_and_eager(lambda: layer(x), x):
        assert torch.equal(out, y)


@pytest.mark.parametrize("first_gemm", list(FIRST_GEMMS))
def test_calls_whose_layout_would_mostly_be_fixups_run_in_grouped_rows(first_gemm, monkeypatch):
    """The forward's slot monitor on one layer: the first one-sided call (every token to experts
    0..K-1) runs in slots and writes its fix-up share (every overflowing expert's rows rounded up
    to the row tile, per 1024 routed rows) into pinned memory; the next one-sided call runs in
    grouped rows (and measures its share too); once a balanced call has been measured, calls run
    in slots again. Outputs as the Python path's either way."""
    monkeypatch.setattr(native_forward, "_gathered_enabled", first_gemm == "gathered")
    layer = slotted_layer(False, "balanced")   # gate row e reads feature e
    T = 512
    balanced = tokens(T, "balanced")
    skewed = balanced.clone()
    skewed[:, :E] = 0.0
    skewed[:, :K] = (2.0 * (K - torch.arange(K, device=DEV, dtype=torch.float32)) + 2.0).to(skewed.dtype)
    layouts = []   # (native function, slot capacity of a gathered call)
    real = ops._native.load()
    for name in ("moe_forward_nograd_gathered", "moe_forward_nograd_slotted", "moe_forward_nograd"):
        fn = getattr(real, name)
        monkeypatch.setattr(real, name, lambda *a, _fn=fn, _name=name: layouts.append(
            (_name, a[12] if _name == "moe_forward_nograd_gathered" else None)) or _fn(*a))
    with torch.no_grad():
        layer(skewed)   # slots (nothing measured yet): registers the Triton variants, writes its share
    torch.cuda.synchronize()
    monitor = layer._forward_slot_monitor
    C = capacity_for(1.0, T, E, K)
    want = K * -(-(T - C) // 128) * 128 * 1024 // (T * K)
    assert int(monitor._count[0]) == want > 1024 * native_forward.MAX_FIXUP_SHARE
    in_slots = ((FIRST_GEMMS[first_gemm], C if first_gemm == "gathered" else None),)
    in_rows = (("moe_forward_nograd", None) if first_gemm == "dispatched" else ("moe_forward_nograd_gathered", -1),)
    layouts.clear()
    y, _ = call(layer, skewed)
    assert tuple(layouts) == in_rows, layouts
    y_py, _ = call(layer, skewed, native=False)
    torch.testing.assert_close(y, y_py, rtol=2e-2, atol=2e-2 * max(1.0, y_py.abs().max().item()))
    call(layer, balanced)
    torch.cuda.synchronize()
    assert int(monitor._count[0]) == 0
    layouts.clear()
    call(layer, balanced)
    assert tuple(layouts) == in_slots, layouts
