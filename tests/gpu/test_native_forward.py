"""The one-call native forward (adaptmoe.native_forward) against the Python path and the float64
per-token reference: same outputs, routing and losses; it runs exactly when its blocker says so."""
import copy
import pickle

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

import adaptmoe as am  # noqa: E402
from adaptmoe import native_forward, ops  # noqa: E402
from adaptmoe.ops import _triton_gemm  # noqa: E402
from gpu_poison import poison  # noqa: E402
from graph_replay import replays_and_eager  # noqa: E402
from native_calls import served_natively  # noqa: E402

from reference import reference_forward  # noqa: E402

DEV = "cuda"
# Against the float64 reference: one rounding per GEMM output in the compute dtype.
REF_TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}

CASES = [   # (kind, gate, act, bias, postscore, E, k, D, H)
    ("ffn", "softmax", "relu", False, True, 8, 2, 64, 128),
    ("ffn", "softmax", "relu", True, False, 6, 1, 72, 96),
    ("ffn", "sigmoid", "gelu", True, True, 8, 3, 64, 64),
    ("gated_ffn", "softmax", "silu", False, True, 4, 2, 64, 128),
    ("ffn", "softmax", "relu", False, True, 4, 4, 64, 64),      # k == E
    ("ffn", "softmax", "identity", True, True, 1, 1, 32, 48),   # one expert
]


# The native call's gshard loss sums fp32 probabilities in its own order; for sigmoid gates the
# Python path rounds the normalised probabilities to the scores' dtype first, the native kernel
# does not: one rounding of the scores' dtype apart at most.
LOSS_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}


def assert_loss_close(l_aux, l_aux_py, dtype):
    assert l_aux.dtype == l_aux_py.dtype == torch.float32 and l_aux.shape == l_aux_py.shape == ()
    torch.testing.assert_close(l_aux, l_aux_py, rtol=LOSS_TOL[dtype], atol=1e-6)


def make_layer(case, dtype, cf):
    kind, gate, act, bias, postscore, E, k, D, H = case
    torch.manual_seed(0)
    experts = am.ExpertConfig(kind=kind, hidden_size=H, activation=act, has_fc1_bias=bias, has_fc2_bias=bias)
    cfg = am.MoEConfig(model_dim=D, num_experts=E, gate=am.GateConfig(kind=gate, top_k=k, capacity_factor=cf),
                       experts=experts, is_postscore=postscore)
    return am.MoELayer(cfg).to(device=DEV, dtype=dtype).eval()


def plan_of(layer, x, **knobs):
    with torch.no_grad():
        x_TD, _ = layer.flatten_input(x)
        return native_forward.plan_for(layer, x_TD, layer.resolve_knobs(**knobs))


def gathered_plan(layer, x, **knobs) -> bool:
    """Whether the call runs the first GEMM through the gathered Triton kernel."""
    plan = plan_of(layer, x, **knobs)
    return plan is not None and plan.gathered_fc1


def registered_gathered_variants(layer, x) -> list[int]:
    """The compiled variants of the gathered first GEMM for the layer's weights that its launches
    registered with the extension (the native call picks from these)."""
    w = layer.experts.stored_weights()
    return _triton_gemm.gathered_fc1_variants(x, w.w1_eHD, w.b1_eH)


def dense_call(layer, x, **knobs) -> bool:
    """Whether the call takes the dense layout (k == E, nothing dropped: no dispatch)."""
    from adaptmoe.routing import capacity_for
    plan = plan_of(layer, x, **knobs)
    resolved = layer.resolve_knobs(**knobs)
    T = x.numel() // layer.config.model_dim
    cap = capacity_for(resolved.capacity_factor, T, layer.config.num_experts, resolved.top_k)
    return plan is not None and plan.dense and T > 0 and (cap is None or cap >= T)


def reference_on_cpu(layer, x):
    """The float64 per-token reference (a CPU loop) of the layer's current parameters."""
    return reference_forward(copy.deepcopy(layer).cpu(), x.cpu()).to(x.device)


def both_paths(layer, x, **knobs):
    """(native call's result, Python path's result) as (y, l_aux, routing) of the same inputs."""
    def call(enabled):
        native_forward.set_enabled(enabled)
        try:
            with torch.no_grad():
                y = layer(x, **knobs)
            return y, y.l_aux, layer.last_routing
        finally:
            native_forward.set_enabled(True)
    return call(True), call(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cf", [1.0, 0.0, 0.5, -2.0])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-E{c[5]}k{c[6]}")
def test_native_forward_matches_python_path_and_reference(case, dtype, cf):
    layer = make_layer(case, dtype, cf)
    x = torch.randn(2, 37, layer.config.model_dim, device=DEV, dtype=dtype)
    with torch.no_grad():
        blocker = layer.native_forward_blocker(x)
    grouped = cf == 0 and case[6] != case[5]
    if grouped and dtype != torch.bfloat16:
        assert blocker is not None and "dropless" in blocker
    else:
        assert blocker is None
    (y, l_aux, routing), (y_py, l_aux_py, routing_py) = both_paths(layer, x)
    if gathered_plan(layer, x) or dense_call(layer, x):   # GEMMs of other shapes: one rounding apart
        rtol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(y, y_py, rtol=rtol, atol=rtol * max(1.0, y_py.abs().max().item()))
    else:   # same kernels in the same order: bit for bit
        assert torch.equal(y, y_py)
    assert_loss_close(l_aux, l_aux_py, dtype)
    for name in ("indices_TK", "weights_TK", "locations_TK", "counts_E", "slots_TK"):
        assert torch.equal(getattr(routing, name), getattr(routing_py, name)), name
    assert (routing.capacity, routing.num_rows) == (routing_py.capacity, routing_py.num_rows)
    want = reference_on_cpu(layer, x)
    tol = REF_TOL[dtype]
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("T", [0, 1])
@pytest.mark.parametrize("cf", [1.0, 0.0])
def test_native_forward_tiny_batches(T, cf):
    layer = make_layer(CASES[0], torch.bfloat16, cf)
    x = torch.randn(T, layer.config.model_dim, device=DEV, dtype=torch.bfloat16)
    (y, _, _), (y_py, _, _) = both_paths(layer, x)
    assert y.shape == (T, layer.config.model_dim)
    torch.testing.assert_close(y, y_py, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("slotted", [False, True], ids=["grouped", "slotted"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("T", [1, 37, 300])
def test_gathered_first_gemm_dropless(T, bias, slotted, monkeypatch):
    """Dropless fine-grained experts: the first GEMM gathers its rows (Triton) with relu and bias
    in its epilogue, over the grouped rows or cf=1's slots; against the Python path and the
    float64 reference, experts without tokens included, and the A/B switch turns it off."""
    monkeypatch.setattr(native_forward, "_slotted_enabled", slotted)
    torch.manual_seed(T)
    experts = am.ExpertConfig(hidden_size=256, activation="relu", has_fc1_bias=bias, has_fc2_bias=False)
    # fp32 gate: the float64 reference then picks the same experts (a bf16 gate can break near-ties
    # of the logits differently from it)
    cfg = am.MoEConfig(model_dim=128, num_experts=16, gate=am.GateConfig(top_k=4, capacity_factor=0.0, fp32=True),
                       experts=experts)
    layer = am.MoELayer(cfg).to(device=DEV, dtype=torch.bfloat16).eval()
    x = torch.randn(T, 128, device=DEV, dtype=torch.bfloat16)
    x[:, 0] = 4.0
    with torch.no_grad():   # experts 12..15 get logit ~-40 from feature 0: never picked
        layer.gates[0].wg.weight[12:, 0] = -10.0
    assert gathered_plan(layer, x)
    monkeypatch.setattr(native_forward, "_GATHER_MIN_ELEMENTS", 0)   # small test shapes take it too
    assert plan_of(layer, x).slotted == slotted
    (y, _, routing), (y_py, _, _) = both_paths(layer, x)
    if T >= 37:
        assert int(routing.counts_E[12:].sum()) == 0
    torch.testing.assert_close(y, y_py, rtol=2e-2, atol=2e-2 * max(1.0, y_py.abs().max().item()))
    want = reference_on_cpu(layer, x)
    torch.testing.assert_close(y.double(), want, rtol=6e-2, atol=6e-2 * max(1.0, want.abs().max().item()))
    native_forward.set_gathered_enabled(False)
    try:
        assert not gathered_plan(layer, x)
    finally:
        native_forward.set_gathered_enabled(True)


def gathered_layer(bias: bool = True):
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=128, num_experts=16, gate=am.GateConfig(top_k=4, capacity_factor=0.0),
                       experts=am.ExpertConfig(hidden_size=256, has_fc1_bias=bias, has_fc2_bias=False))
    return am.MoELayer(cfg).to(device=DEV, dtype=torch.bfloat16).eval()


def test_gathered_path_replays_from_a_cuda_graph(monkeypatch):
    """The gathered dropless path reads counts only on the device: it captures and replays (in
    slots whatever the overflow: the eager calls then decide as the captured one did)."""
    monkeypatch.setattr(native_forward, "_GATHER_MIN_ELEMENTS", 0)
    monkeypatch.setattr(native_forward, "MAX_FIXUP_SHARE", float("inf"))
    layer = gathered_layer()
    x = torch.randn(96, 128, device=DEV, dtype=torch.bfloat16)
    assert gathered_plan(layer, x)
    for out, y in replays_and_eager(lambda: layer(x), x):
        assert torch.equal(out, y)   # the same kernels on the same inputs


def test_gathered_kernel_launched_from_the_native_call(monkeypatch):
    """After a call launched the gathered GEMM through Triton, later calls launch it from inside
    the native call: the same kernels in the same order, so the same bits as Triton's launcher
    gives. A call whose arguments break an assumption of every registered variant falls back to
    Triton's launcher once and registers the variant it ran. If Triton folds top_k 1 into a
    constant, the first variant cannot serve top_k 4, and the one compiled for 500 tokens (32
    programs, a multiple of 16) cannot serve 300 (26); if it does not fold it, the first variant
    (19 programs, no divisibility assumed) serves every call. (Grouped rows: the slotted layout's
    fix-up kernels are tests/gpu/test_native_slotted_forward.py's.)"""
    monkeypatch.setattr(native_forward, "_GATHER_MIN_ELEMENTS", 0)
    monkeypatch.setattr(native_forward, "_slotted_enabled", False)
    monkeypatch.setattr(_triton_gemm._grouped_rows_launches, "_variants", {})
    served = served_natively(monkeypatch)
    layer = gathered_layer()
    for T, k in ((300, 1), (300, 1), (500, 4), (500, 4), (300, 4), (300, 4)):
        x = torch.randn(T, 128, device=DEV, dtype=torch.bfloat16)
        with torch.no_grad():
            y = layer(x, top_k=k)
            loss, routing = layer.l_aux, layer.last_routing
            native_forward.set_triton_from_native(False)
            try:
                y_py = layer(x, top_k=k)
            finally:
                native_forward.set_triton_from_native(True)
        assert torch.equal(y, y_py)
        assert torch.equal(loss, layer.l_aux)
        for name in ("indices_TK", "weights_TK", "locations_TK", "counts_E", "slots_TK"):
            assert torch.equal(getattr(routing, name), getattr(layer.last_routing, name)), name
    # the first call found nothing registered, so five calls went to the native side
    assert served in ([True, False, True, False, True], [True] * 5)
    assert len(registered_gathered_variants(layer, x)) == served.count(False) + 1


@pytest.mark.parametrize("slotted", [False, True], ids=["grouped", "slotted"])
def test_natively_launched_gathered_path_replays_from_a_cuda_graph(slotted, monkeypatch):
    monkeypatch.setattr(native_forward, "_GATHER_MIN_ELEMENTS", 0)
    monkeypatch.setattr(native_forward, "_slotted_enabled", slotted)
    monkeypatch.setattr(native_forward, "MAX_FIXUP_SHARE", float("inf"))   # eager calls decide as captured
    monkeypatch.setattr(_triton_gemm._grouped_rows_launches, "_variants", {})
    layer = gathered_layer(bias=False)
    x = torch.randn(96, 128, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        layer(x)   # registers the kernel
    assert registered_gathered_variants(layer, x)
    for out, y in replays_and_eager(lambda: layer(x), x):
        assert torch.equal(out, y)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("cf,T", [(1.0, 300), (0.5, 300), (-1.5, 300), (1.0, 1), (2.0, 37)])
def test_gathered_first_gemm_with_capacity(cf, T, bias, monkeypatch):
    """Capacity calls of small relu experts gather their padded rows in the first GEMM (Triton;
    every expert C rows, unfed ones computed and never read): launched through Triton's launcher
    first, then from inside the native call, each against the Python path (dispatch and batched
    GEMMs: the same routing, outputs within a rounding) and the float64 reference; cf 0.5 drops
    choices (random routing), outputs poisoned first."""
    monkeypatch.setattr(native_forward, "_GATHER_MIN_ELEMENTS", 0)   # small test shapes take it too
    monkeypatch.setattr(_triton_gemm._grouped_rows_launches, "_variants", {})
    torch.manual_seed(T)
    experts = am.ExpertConfig(hidden_size=256, activation="relu", has_fc1_bias=bias, has_fc2_bias=False)
    cfg = am.MoEConfig(model_dim=128, num_experts=16, gate=am.GateConfig(top_k=4, capacity_factor=cf, fp32=True),
                       experts=experts)
    layer = am.MoELayer(cfg).to(device=DEV, dtype=torch.bfloat16).eval()
    x = torch.randn(T, 128, device=DEV, dtype=torch.bfloat16)
    assert gathered_plan(layer, x)
    for launch in ("triton", "native"):
        poison(1 << 22)
        (y, l_aux, routing), (y_py, l_aux_py, routing_py) = both_paths(layer, x)
        assert registered_gathered_variants(layer, x), launch   # the first call registered its variant
        assert routing.capacity == routing_py.capacity > 0
        for name in ("indices_TK", "weights_TK", "locations_TK", "counts_E", "slots_TK"):
            assert torch.equal(getattr(routing, name), getattr(routing_py, name)), name
        if cf == 0.5 and T == 300:
            assert int((routing.slots_TK < 0).sum()) > 0   # some choices dropped
        torch.testing.assert_close(y, y_py, rtol=2e-2, atol=2e-2 * max(1.0, y_py.abs().max().item()))
        assert_loss_close(l_aux, l_aux_py, torch.bfloat16)
    want = reference_on_cpu(layer, x)
    torch.testing.assert_close(y.double(), want, rtol=6e-2, atol=6e-2 * max(1.0, want.abs().max().item()))


def test_gathered_capacity_path_replays_from_a_cuda_graph(monkeypatch):
    monkeypatch.setattr(native_forward, "_GATHER_MIN_ELEMENTS", 0)
    monkeypatch.setattr(_triton_gemm._grouped_rows_launches, "_variants", {})
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=128, num_experts=16, gate=am.GateConfig(top_k=4, capacity_factor=1.0),
                       experts=am.ExpertConfig(hidden_size=256, has_fc2_bias=False))
    layer = am.MoELayer(cfg).to(device=DEV, dtype=torch.bfloat16).eval()
    x = torch.randn(96, 128, device=DEV, dtype=torch.bfloat16)
    assert gathered_plan(layer, x)
    with torch.no_grad():
        layer(x)   # registers the kernel: the replays launch it from inside the native call
    assert registered_gathered_variants(layer, x)
    for out, y in replays_and_eager(lambda: layer(x), x):
        assert torch.equal(out, y)


def test_gathered_kernel_vs_per_expert_matmul():
    """ops._triton_gemm.gathered_fc1_relu on poisoned output memory against relu(x[tok] w^T + b)
    computed expert by expert in float32, with zero-token experts and uneven counts."""
    torch.manual_seed(0)
    T, K, E, D, H = 200, 3, 8, 192, 384
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16)
    w1 = torch.randn(E, H, D, device=DEV, dtype=torch.bfloat16) / D ** 0.5
    b1 = torch.randn(E, H, device=DEV, dtype=torch.bfloat16)
    counts = torch.tensor([0, 130, 1, 0, 200, 69, 200, 0], device=DEV)
    inv = torch.randperm(T * K, device=DEV).to(torch.int32)   # any choice may feed any row
    poison(T * K * H * 2)   # NaN into the cache
    h = _triton_gemm.gathered_fc1_relu(x, inv, K, counts, w1, b1)
    rows = x.float()[(inv // K).long()]
    want, start = torch.empty(T * K, H, device=DEV), 0
    for e, n in enumerate(counts.tolist()):
        want[start:start + n] = torch.relu(rows[start:start + n] @ w1[e].float().t() + b1[e].float())
        start += n
    rtol, atol = _triton_gemm.TOLERANCE
    torch.testing.assert_close(h.float(), want, rtol=rtol, atol=atol)


DENSE_CASES = [   # (kind, act, bias, E, D, H): k == E
    ("ffn", "relu", False, 2, 128, 256),     # Tutel's README layer, small
    ("ffn", "relu", True, 4, 64, 96),
    ("ffn", "gelu", True, 3, 72, 40),
    ("gated_ffn", "silu", False, 2, 64, 128),
    ("ffn", "relu", False, 1, 32, 48),
]


@pytest.mark.parametrize("cf", [1.0, 0.0, -1.0, 2.0, 0.5])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: f"{c[0]}-{c[1]}-bias{c[2]}-E{c[3]}")
def test_dense_layout_when_every_token_goes_to_every_expert(case, cf):
    """k == E, post-scored: calls that drop nothing run without a dispatch (first GEMM over the
    tokens for all experts at once, combine from token-major rows); same outputs, routing and loss
    as the dispatched native call within a rounding, and the float64 reference; cf < 1 drops
    choices and keeps the dispatch."""
    kind, act, bias, E, D, H = case
    torch.manual_seed(E)
    experts = am.ExpertConfig(kind=kind, hidden_size=H, activation=act, has_fc1_bias=bias, has_fc2_bias=bias)
    cfg = am.MoEConfig(model_dim=D, num_experts=E, gate=am.GateConfig(top_k=E, capacity_factor=cf, fp32=True),
                       experts=experts)
    layer = am.MoELayer(cfg).to(device=DEV, dtype=torch.bfloat16).eval()
    x = torch.randn(3, 41, D, device=DEV, dtype=torch.bfloat16)
    assert dense_call(layer, x) == (cf != 0.5)

    def call(dense):
        native_forward.set_dense_enabled(dense)
        try:
            with torch.no_grad():
                y = layer(x)
            return y, y.l_aux, layer.last_routing
        finally:
            native_forward.set_dense_enabled(True)
    poison(1 << 22)
    (y, l_aux, routing), (y_disp, l_aux_disp, routing_disp) = call(True), call(False)
    torch.testing.assert_close(y, y_disp, rtol=2e-2, atol=2e-2 * max(1.0, y_disp.abs().max().item()))
    assert torch.equal(l_aux, l_aux_disp)
    for name in ("indices_TK", "weights_TK", "locations_TK", "counts_E", "slots_TK"):
        assert torch.equal(getattr(routing, name), getattr(routing_disp, name)), name
    want = reference_on_cpu(layer, x)
    torch.testing.assert_close(y.double(), want, rtol=6e-2, atol=6e-2 * max(1.0, want.abs().max().item()))


def test_dense_layout_replays_from_a_cuda_graph():
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=128, num_experts=2, gate=am.GateConfig(top_k=2, capacity_factor=1.0),
                       experts=am.ExpertConfig(hidden_size=256))
    layer = am.MoELayer(cfg).to(device=DEV, dtype=torch.bfloat16).eval()
    x = torch.randn(96, 128, device=DEV, dtype=torch.bfloat16)
    assert dense_call(layer, x)
    for out, y in replays_and_eager(lambda: layer(x), x):
        assert torch.equal(out, y)


@pytest.mark.parametrize("losses", [("gshard",), ("gshard", "z_loss"), ("none",), ()])
def test_losses_in_the_native_call_only_when_gshard_alone(losses):
    """A gate whose only loss is gshard gets it from the native call (one kernel pair, no autograd);
    other loss sets keep the Python losses, so the sum matches the Python path exactly."""
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=64, num_experts=8, gate=am.GateConfig(top_k=2, losses=losses),
                       experts=am.ExpertConfig(hidden_size=64))
    layer = am.MoELayer(cfg).to(device=DEV, dtype=torch.bfloat16).eval()
    x = torch.randn(50, 64, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        x_TD, _ = layer.flatten_input(x)
        plan = native_forward.plan_for(layer, x_TD, layer.resolve_knobs())
    assert plan is not None and plan.gshard_loss == (losses == ("gshard",))
    (y, l_aux, _), (y_py, l_aux_py, _) = both_paths(layer, x)
    assert torch.equal(y, y_py)
    if plan.gshard_loss:
        assert_loss_close(l_aux, l_aux_py, torch.bfloat16)
        assert set(layer.losses) == {"gshard"}
    else:
        assert torch.equal(l_aux, l_aux_py)


def test_experts_without_tokens_and_dropped_choices():
    layer = make_layer(CASES[0], torch.bfloat16, 0.5)
    x = torch.rand(64, layer.config.model_dim, device=DEV, dtype=torch.bfloat16)   # positive features
    with torch.no_grad():   # experts 0 and 1 win every token: the others get none, 0 and 1 overflow
        layer.gates[0].wg.weight[:2].fill_(0.1)
        layer.gates[0].wg.weight[2:].fill_(-0.1)
    (y, _, routing), (y_py, _, _) = both_paths(layer, x)
    assert int(routing.counts_E[2:].sum()) == 0 and int((routing.slots_TK < 0).sum()) > 0
    assert torch.equal(y, y_py)
    torch.testing.assert_close(y.double(), reference_on_cpu(layer, x), rtol=6e-2, atol=6e-2)


@pytest.mark.parametrize("cf", [1.0, 0.0])
def test_native_forward_replays_from_a_cuda_graph(cf):
    layer = make_layer(CASES[0], torch.bfloat16, cf)
    x = torch.randn(96, layer.config.model_dim, device=DEV, dtype=torch.bfloat16)
    for out, y in replays_and_eager(lambda: layer(x), x):
        assert torch.equal(out, y)


def test_planned_calls_take_the_native_call_too():
    """plan='auto' in one process: the planner's warmup and later calls run the native call and
    match the Python path."""
    layer = make_layer(CASES[0], torch.bfloat16, 1.0)
    x = torch.randn(64, layer.config.model_dim, device=DEV, dtype=torch.bfloat16)
    for _ in range(3):   # warmup calls (timed by the planner), then a planned one
        (y, _, _), (y_py, _, _) = both_paths(layer, x, plan="auto")
        assert torch.equal(y, y_py)


def test_blocker_reasons():
    layer = make_layer(CASES[0], torch.bfloat16, 1.0)
    x = torch.randn(8, layer.config.model_dim, device=DEV, dtype=torch.bfloat16)
    assert "gradients" in layer.native_forward_blocker(x)   # grad mode on here
    with torch.no_grad():
        assert layer.native_forward_blocker(x) is None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert "autocast" in layer.native_forward_blocker(x)
        ops.set_native_enabled(False)
        try:
            assert "native extension" in layer.native_forward_blocker(x)
        finally:
            ops.set_native_enabled(True)
        assert layer.native_forward_blocker(x) is None


def test_odd_model_dim_second_gate_and_training_mode():
    """D not a multiple of 16 bytes (no relu epilogue, no grouped GEMM), a second gate picked per
    call with its own k and capacity, and a layer left in training mode without noise."""
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=36, num_experts=5,
                       gate=am.GateConfig(top_k=2, capacity_factor=1.0),
                       extra_gates=(am.GateConfig(kind="sigmoid", top_k=3, capacity_factor=-1.5),),
                       experts=am.ExpertConfig(hidden_size=20))
    layer = am.MoELayer(cfg).to(device=DEV, dtype=torch.bfloat16)   # training mode
    x = torch.randn(50, 36, device=DEV, dtype=torch.bfloat16)
    for knobs in ({}, {"gate_index": 1}, {"gate_index": 1, "top_k": 1}):
        with torch.no_grad():
            assert layer.native_forward_blocker(x, **knobs) is None
        (y, l_aux, _), (y_py, l_aux_py, _) = both_paths(layer, x, **knobs)
        assert torch.equal(y, y_py)
        assert_loss_close(l_aux, l_aux_py, torch.bfloat16)
        want = reference_on_cpu_knobs(layer, x, **knobs)
        torch.testing.assert_close(y.double(), want, rtol=6e-2, atol=6e-2 * max(1.0, want.abs().max().item()))
    with torch.no_grad():
        assert "dropless" in layer.native_forward_blocker(x, capacity_factor=0.0)   # D % 8 != 0


def test_noisy_gate_in_training_takes_the_python_path():
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=32, num_experts=4, gate=am.GateConfig(top_k=2, noise_std=1.0),
                       experts=am.ExpertConfig(hidden_size=32))
    layer = am.MoELayer(cfg).to(DEV)
    x = torch.randn(8, 32, device=DEV)
    with torch.no_grad():
        assert "noise" in layer.native_forward_blocker(x)
        assert layer.eval().native_forward_blocker(x) is None   # eval: no noise is drawn


def reference_on_cpu_knobs(layer, x, gate_index=0, top_k=None):
    return reference_forward(copy.deepcopy(layer).cpu(), x.cpu(), gate_index=gate_index,
                             top_k=top_k).to(x.device)


def served_by_repeat(monkeypatch) -> list:
    """Counts the calls native_forward.repeat served (a list of 1s) while the test runs."""
    served, real = [], native_forward.repeat

    def counting(layer, call, x):
        result = real(layer, call, x)
        if result is not None:
            served.append(1)
        return result
    monkeypatch.setattr(native_forward, "repeat", counting)
    return served


@pytest.mark.parametrize("cf", [1.0, 0.0, -2.0])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}-E{c[5]}k{c[6]}")
def test_repeat_calls_match_the_full_path(case, cf, monkeypatch):
    """A call with the knob arguments of an earlier native call takes the short way (no knob
    checks, flattening or plan lookup) to the same native call: the same bits as the full path,
    for the same and for other token counts."""
    served = served_by_repeat(monkeypatch)
    layer = make_layer(case, torch.bfloat16, cf)
    x, x_other = (torch.randn(T, layer.config.model_dim, device=DEV, dtype=torch.bfloat16) for T in (40, 24))
    with torch.no_grad():
        first = layer(x, capacity_factor=cf)
        again, routing_again = layer(x, capacity_factor=cf), layer.last_routing
        other, l_aux_other = layer(x_other, capacity_factor=cf), layer.l_aux
    assert len(served) == 2

    def full_path(x):
        layer.__dict__.pop("_repeat_calls")
        with torch.no_grad():
            return layer(x, capacity_factor=cf)
    other_full = full_path(x_other)
    l_aux_full = layer.l_aux
    first_full = full_path(x)
    routing_full = layer.last_routing
    assert len(served) == 2
    assert torch.equal(first, again) and torch.equal(again, first_full) and torch.equal(other, other_full)
    assert torch.equal(l_aux_other, l_aux_full) and torch.equal(again.l_aux, first_full.l_aux)
    for name in ("indices_TK", "weights_TK", "locations_TK", "counts_E", "slots_TK"):
        assert torch.equal(getattr(routing_again, name), getattr(routing_full, name)), name


def test_layers_with_remembered_calls_deep_copy_and_pickle():
    layer = make_layer(CASES[0], torch.bfloat16, 1.0)
    x = torch.randn(16, layer.config.model_dim, device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)
        assert layer.__dict__["_repeat_calls"]
        copied = copy.deepcopy(layer)
        assert torch.equal(copied(x), y)
        restored = pickle.loads(pickle.dumps(layer))
        assert torch.equal(restored(x), y)


def test_repeat_calls_see_replaced_changed_and_converted_weights(monkeypatch):
    served = served_by_repeat(monkeypatch)
    layer = make_layer(CASES[0], torch.bfloat16, 1.0)
    x = torch.randn(64, layer.config.model_dim, device=DEV, dtype=torch.bfloat16)

    def check(layer, x, tol):
        with torch.no_grad():
            y = layer(x)
        want = reference_on_cpu(layer, x)
        torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol * max(1.0, want.abs().max().item()))
    check(layer, x, REF_TOL[torch.bfloat16])
    layer.experts.batched_fc1_w = torch.nn.Parameter(torch.randn_like(layer.experts.batched_fc1_w) * 0.1)
    check(layer, x, REF_TOL[torch.bfloat16])   # a new parameter: the full path, remembered anew
    with torch.no_grad():
        layer.experts.batched_fc2_w.mul_(2.0)   # in place: the remembered call reads it
        layer.gates[0].wg.weight.neg_()
    check(layer, x, REF_TOL[torch.bfloat16])
    layer.half()   # the same parameter objects in another dtype
    check(layer, x.half(), REF_TOL[torch.float16])
    assert len(served) == 1   # only the in-place change was served the short way
