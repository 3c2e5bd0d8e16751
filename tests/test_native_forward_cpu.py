"""The one-call native forward's gatekeeping on CPU: it never serves a CPU, grad-mode or
switched-off call, each layer signature it cannot serve gets a reason, and the gathered Triton
GEMM names its own blockers (the GPU tests check the calls they do serve)."""
import pytest
import torch

import adaptmoe as am
from adaptmoe import native_forward


def make_layer(**gate):
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=16, num_experts=4, gate=am.GateConfig(top_k=2, **gate),
                       experts=am.ExpertConfig(hidden_size=32))
    return am.MoELayer(cfg).eval()


def test_reasons_name_what_blocks_the_native_call():
    layer = make_layer()
    x = torch.randn(5, 16)
    assert "gradients" in layer.native_forward_blocker(x)
    with torch.no_grad():
        assert layer.native_forward_blocker(x) == "not a CUDA tensor"
        native_forward.set_enabled(False)
        try:
            assert "set_enabled(False)" in layer.native_forward_blocker(x)
        finally:
            native_forward.set_enabled(True)


def test_blocker_validates_knobs_like_forward():
    layer = make_layer()
    with torch.no_grad(), pytest.raises(ValueError, match="top_k"):
        layer.native_forward_blocker(torch.randn(5, 16), top_k=9)
    with pytest.raises(ValueError, match="model_dim"):
        layer.native_forward_blocker(torch.randn(5, 15))



class _FakeNative:
    """The limits the signature check reads from the extension."""
    max_topk_experts = 1024
    max_locate_experts = 2048


class _MyExperts(torch.nn.Module):
    def __init__(self, model_dim, num_local_experts, sharded_count):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(num_local_experts, model_dim, model_dim))

    def forward(self, x_eCD):
        return x_eCD @ self.w


def _signature_reason(cfg: am.MoEConfig, dtype=torch.float32, train=False, top_k=2, dropless=False):
    layer = am.MoELayer(cfg).to(dtype).train(train)
    x_TD = torch.randn(4, cfg.model_dim, dtype=dtype)
    plan = native_forward._signature_plan(layer, x_TD, _FakeNative(), 0, top_k, dropless)
    return plan if isinstance(plan, str) else None


@pytest.mark.parametrize("change, expected", [
    (dict(gate=am.GateConfig(kind="cosine", top_k=2)), "gate kind 'cosine'"),
    (dict(gate=am.GateConfig(top_k=2, batch_prioritized=True)), "unfused selection"),
    (dict(experts=am.ExpertConfig(kind="custom", custom_module=_MyExperts)), "custom experts"),
    (dict(experts=am.ExpertConfig(hidden_size=8, activation=torch.nn.functional.softplus)), "custom activation"),
])
def test_each_unserved_signature_has_a_reason(change, expected):
    base = dict(model_dim=16, num_experts=4, gate=am.GateConfig(top_k=2), experts=am.ExpertConfig(hidden_size=8))
    reason = _signature_reason(am.MoEConfig(**{**base, **change}))
    assert reason is not None and expected in reason


def test_training_noise_and_dtype_reasons():
    cfg = am.MoEConfig(model_dim=16, num_experts=4, gate=am.GateConfig(top_k=2, noise_std=1.0),
                       experts=am.ExpertConfig(hidden_size=8))
    assert "noise" in _signature_reason(cfg, train=True)
    assert _signature_reason(cfg, train=False) is None   # no noise is drawn in eval
    plain = am.MoEConfig(model_dim=16, num_experts=4, experts=am.ExpertConfig(hidden_size=8))
    assert "dtype" in _signature_reason(plain, dtype=torch.float64)
    assert _signature_reason(plain, top_k=4, dropless=True) is None   # k == E: a padded batch


def test_gathered_gemm_blocker_names_its_reasons():
    from adaptmoe.ops import _triton_gemm
    x = torch.randn(8, 128, dtype=torch.bfloat16)
    w1 = torch.randn(4, 256, 128, dtype=torch.bfloat16)
    reason = _triton_gemm.gathered_fc1_blocker(x, w1, None, is_relu=True)
    assert reason in ("triton is not importable", "needs a CUDA GPU of compute capability 9.0 or newer")


def test_triton_training_ffn_blocker_names_its_reasons():
    from adaptmoe.ops import _triton_ffn
    x = torch.randn(8, 128, dtype=torch.bfloat16)
    w1, w2 = torch.randn(4, 256, 128, dtype=torch.bfloat16), torch.randn(4, 256, 128, dtype=torch.bfloat16)
    assert "set_enabled(True)" in _triton_ffn.blocker(x, w1, w2, (None, None), is_relu=True, gated=False)
    _triton_ffn.set_enabled(True)
    try:
        assert "gated" in _triton_ffn.blocker(x, w1, w2, (None, None), is_relu=True, gated=True)
        assert "relu" in _triton_ffn.blocker(x, w1, w2, (None, None), is_relu=False, gated=False)
        assert _triton_ffn.blocker(x, w1, w2, (None, None), is_relu=True, gated=False) in (
            "triton is not importable", "needs a CUDA GPU of compute capability 9.0 or newer")
    finally:
        _triton_ffn.set_enabled(False)


def test_triton_training_ffn_picks_grouped_mm_weight_gradients_for_short_experts():
    from adaptmoe.ops import _triton_ffn
    fine_grained = _triton_ffn.kernels_for(rows=8192 * 8, experts=64, has_bias=False)      # 1024 rows each
    deepseek = _triton_ffn.kernels_for(rows=16384 * 8, experts=256, has_bias=False)        # 512 rows each
    deepseek_biases = _triton_ffn.kernels_for(rows=16384 * 8, experts=256, has_bias=True)
    assert fine_grained == _triton_ffn.FFNKernels("triton", "triton")
    assert deepseek == _triton_ffn.FFNKernels("triton", "grouped_mm")
    assert deepseek_biases.weight_grads == "triton"   # the bias gradients come from its column sums


class _GatheredNative:
    """A stand-in extension for native_forward._run_gathered: records which side launched the
    gathered GEMM. `serve` says whether the one native call finds a registered variant."""

    def __init__(self, T, k, E):
        self.T, self.k, self.E = T, k, E
        self.serve, self.native_calls, self.registered, self.capacities, self.fixup_calls = True, [], [], [], []

    def moe_forward_nograd_gathered(self, x, wg, fp32, k, score_fn, normalize, w1, w2, b1, kernel_ids, loss,
                                    capacity, slot_capacity, fc1_fixup_ids, fc2_fixup_ids, share):
        self.native_calls.append(list(kernel_ids))
        self.fixup_calls.append((list(fc1_fixup_ids), list(fc2_fixup_ids)))
        self.capacities.append((capacity, slot_capacity))
        if not self.serve:
            return []
        return [x.new_full((self.T, w2.shape[2]), 7.0)] + self._routing() + [torch.zeros(())]

    def moe_route_nograd(self, x, wg, fp32, k, score_fn, normalize, capacity, slot_capacity):
        self.capacities.append((capacity, slot_capacity))
        padded = slot_capacity if slot_capacity >= 0 else capacity
        rows = self.T * k if padded < 0 else self.E * padded
        routed = self._routing() + [torch.arange(rows, dtype=torch.int32) % (self.T * k)]
        if slot_capacity < 0:
            return routed
        n = self.T * k   # slots_TK, rows_O, choice_O, over_E, capacity_E
        return routed + [torch.arange(n).view(self.T, k), torch.zeros(n, dtype=torch.long),
                         torch.zeros(n, dtype=torch.long), torch.zeros(self.E, dtype=torch.long),
                         torch.full((self.E,), slot_capacity)]

    def _routing(self):
        T, k, E = self.T, self.k, self.E
        idx = torch.arange(T * k).view(T, k) % E
        return [torch.zeros(T, E), idx, torch.full((T, k), 1.0 / k), torch.full((T, E), 1.0 / E),
                torch.zeros(T, k, dtype=torch.long), torch.full((E,), T * k // E), torch.arange(T * k).view(T, k)]

    def moe_forward_nograd_slotted(self, x, wg, fp32, k, score_fn, normalize, postscore, w1, w2, b1, slot_capacity,
                                   loss, fc1_fixup_ids, fc2_fixup_ids, share):
        self.fixup_calls.append((list(fc1_fixup_ids), list(fc2_fixup_ids)))
        self.capacities.append((-1, slot_capacity))
        if not self.serve:
            return []
        return [x.new_full((self.T, w2.shape[2]), 7.0)] + self._routing() + [torch.zeros(())]

    def scatter_rows(self, x, slots, num_rows, scale, dot):
        assert scale is None and slots.shape == (self.T, self.k)
        return [x.new_zeros(num_rows, x.shape[1])]

    def gather_rows(self, y_RO, slots, weights, dot):
        return [y_RO[:self.T] * 0 + 3.0]

    def gshard_loss(self, scores, indices, normalize_rows):
        return torch.zeros(())

    def register_triton_kernel(self, *registration):
        self.registered.append(registration)
        return len(self.registered) - 1


@pytest.mark.parametrize("capacity, slot_capacity", [(None, None), (4, None), (None, 4)],
                         ids=["dropless", "capacity", "slotted"])
def test_gathered_gemm_is_launched_natively_once_a_variant_is_registered(monkeypatch, capacity, slot_capacity):
    """First call: Triton's launcher (Python path), whose compiled kernel gets registered; later
    calls: one native call with the registered ids; a call no variant serves falls back and
    registers the variant Triton ran; turned off, the native side is never asked (turned on again,
    it gets every variant registered meanwhile). Capacity calls gather E * capacity padded rows
    (every expert `capacity` of them) and pass the capacity on; slotted dropless calls gather
    E * slot_capacity rows, run both fix-ups (whose variants the native call also needs) and
    report the dropless routing."""
    from adaptmoe.ops import _triton_gemm
    T, k, E, D, H = 8, 2, 4, 16, 32
    cfg = am.MoEConfig(model_dim=D, num_experts=E, gate=am.GateConfig(top_k=k, capacity_factor=0.0),
                       experts=am.ExpertConfig(hidden_size=H))
    layer = am.MoELayer(cfg).eval()
    fake = _GatheredNative(T, k, E)
    functions = iter(range(100, 200))
    triton_launches, variants, fixups = [], [], ([], [])   # what the launcher registered
    padded = capacity if slot_capacity is None else slot_capacity

    def gathered_fc1_relu(x, inv, top_k, rows_E, w1, b1):   # Triton ran a new variant, registered
        triton_launches.append(top_k)
        assert inv.numel() == int(rows_E.sum()) == (T * k if padded is None else E * padded)
        variants.append(fake.register_triton_kernel(next(functions)))
        return torch.zeros(inv.numel(), H)

    def slot_fixups(x, h, y, w1, b1, w2, top_k, over_E, rows_O, choice_O, *, second):
        assert (y is not None) == second and top_k == k and h.shape[0] == E * slot_capacity
        fixups[second].append(fake.register_triton_kernel(next(functions)))
    monkeypatch.setattr(native_forward._native, "loaded", lambda: fake)
    monkeypatch.setattr(_triton_gemm, "gathered_fc1_relu", gathered_fc1_relu)
    monkeypatch.setattr(_triton_gemm, "gathered_fc1_variants", lambda x, w1, b1: variants)
    monkeypatch.setattr(_triton_gemm, "slot_fixups", slot_fixups)
    monkeypatch.setattr(_triton_gemm, "slot_fixup_variants", lambda x, w1, b1, w2, gathered=True: fixups)
    monkeypatch.setattr(torch, "_grouped_mm", lambda h, w2, offs: torch.zeros(h.shape[0], w2.shape[2]), raising=False)
    plan = native_forward.NativeForwardPlan(score_fn=0, normalize=True, activation=1, relu_epilogue=False,
                                            grouped=True, gathered_fc1=True, gshard_loss=True,
                                            slotted=slot_capacity is not None)
    gate, wg = native_forward._gate_of(layer, 0)

    def call():
        x = torch.randn(T, D)
        return native_forward._run_gathered(layer, x, layer.resolve_knobs(), plan, gate, wg,
                                            layer.experts.stored_weights(), capacity, slot_capacity)
    assert call()[0].eq(3.0).all()                       # Triton's launcher, then the Python combine
    assert (fake.native_calls, len(triton_launches)) == ([], 1)
    assert len(fake.registered) == (1 if slot_capacity is None else 3)
    assert call()[0].eq(7.0).all()                       # one native call with the registered ids
    assert fake.native_calls == [[0]] and len(triton_launches) == 1
    assert fake.fixup_calls == [([], []) if slot_capacity is None else ([1], [2])]
    fake.serve = False
    assert call()[0].eq(3.0).all()                       # no variant fits: fallback, new variant
    assert fake.native_calls[-1] == [0] and len(triton_launches) == 2
    fake.serve = True
    assert call()[0].eq(7.0).all() and len(fake.native_calls[-1]) == 2
    native_forward.set_triton_from_native(False)
    try:
        asked = len(fake.native_calls)
        assert call()[0].eq(3.0).all()
        assert len(fake.native_calls) == asked
    finally:
        native_forward.set_triton_from_native(True)
    assert set(fake.capacities) == {(-1 if capacity is None else capacity, -1 if slot_capacity is None else slot_capacity)}
    routing = call()[1]
    assert len(fake.native_calls[-1]) == 3
    assert (routing.capacity, routing.num_rows) == (capacity, T * k if capacity is None else E * capacity)


def test_slotted_dispatched_forward_is_one_native_call_once_its_fixups_are_registered(monkeypatch):
    """Dropless relu experts too large for the gathered GEMM run in cf=1's slots: the first call
    from Python (dispatch into the slots, cuBLAS's fused relu GEMM, the fix-ups whose Triton launches
    register their variants), later calls as one native call given both fix-ups' ids; a call they
    do not fit falls back; the routing reported is the dropless one."""
    from adaptmoe.ops import _fused_gemm, _triton_gemm
    T, k, E, D, H, C = 8, 2, 4, 16, 32, 4
    cfg = am.MoEConfig(model_dim=D, num_experts=E, gate=am.GateConfig(top_k=k, capacity_factor=0.0),
                       experts=am.ExpertConfig(hidden_size=H))
    layer = am.MoELayer(cfg).eval()
    fake = _GatheredNative(T, k, E)
    functions, fixups, python_steps = iter(range(100, 200)), ([], []), []

    def slot_fixups(x, h, y, w1, b1, w2, top_k, over_E, rows_O, choice_O, *, second):
        assert choice_O is None and top_k == 1 and x.shape == (E * C, D) and h.shape == (E * C, H)
        python_steps.append("fixup2" if second else "fixup1")
        fixups[second].append(fake.register_triton_kernel(next(functions)))

    def fc1_relu(x_eCD, w1, b1):
        python_steps.append("fc1")
        return torch.zeros(E, C, H)
    monkeypatch.setattr(native_forward._native, "loaded", lambda: fake)
    monkeypatch.setattr(_triton_gemm, "slot_fixups", slot_fixups)
    monkeypatch.setattr(_triton_gemm, "slot_fixup_variants", lambda x, w1, b1, w2, gathered=True: fixups)
    monkeypatch.setattr(_fused_gemm, "fc1_relu", fc1_relu)
    plan = native_forward.NativeForwardPlan(score_fn=0, normalize=True, activation=1, relu_epilogue=False,
                                            grouped=True, gshard_loss=True, slotted=True)
    gate, wg = native_forward._gate_of(layer, 0)

    def call():
        return native_forward._run_slotted(layer, torch.randn(T, D), layer.resolve_knobs(), plan, gate, wg,
                                           layer.experts.stored_weights(), C)
    y, routing = call()[:2]
    assert y.eq(3.0).all() and python_steps == ["fc1", "fixup1", "fixup2"] and fake.fixup_calls == []
    assert (routing.capacity, routing.num_rows) == (None, T * k)
    assert call()[0].eq(7.0).all() and fake.fixup_calls == [([0], [1])] and len(python_steps) == 3
    fake.serve = False
    assert call()[0].eq(3.0).all() and len(python_steps) == 6
    assert set(fake.capacities) == {(-1, C)}


def test_dropless_calls_leave_the_slots_while_the_last_measured_fixup_share_is_large(monkeypatch):
    """The forward's slot monitor: no count yet, or a layout whose fix-ups cost at most
    MAX_FIXUP_SHARE of the routed rows: the slotted call (handed the pinned count to write); a
    larger share: the grouped call, after which the share of this call's counts is measured."""
    from adaptmoe.ops import _triton_slotted
    T, k, E = 8, 2, 4
    layer = make_layer(capacity_factor=0.0)
    fake = _GatheredNative(T, k, E)
    grouped, measured, slotted = [], [], []

    def moe_forward_nograd(*args):
        grouped.append(args[6])   # capacity
        return [torch.zeros(T, 16)] + fake._routing() + [torch.zeros(())]
    fake.moe_forward_nograd = moe_forward_nograd
    fake.overflow_fixup_share = lambda counts, C, tile, rows, share: measured.append((C, tile, rows, share))
    monkeypatch.setattr(native_forward._native, "loaded", lambda: fake)
    monkeypatch.setattr(native_forward, "_run_slotted", lambda *args, **kw: slotted.append(args[-2:]) or ("slots",))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monitor = _triton_slotted.OverflowMonitor()   # a count the kernels would write into pinned memory
    monitor._host = torch.full((1,), -1, dtype=torch.int64)
    monitor._count = monitor._host.numpy()
    layer.__dict__["_forward_slot_monitor"] = monitor
    plan = native_forward.NativeForwardPlan(score_fn=0, normalize=True, activation=1, relu_epilogue=False,
                                            grouped=True, slotted=True)
    gate, wg = native_forward._gate_of(layer, 0)

    def call():
        return native_forward._launch(layer, torch.randn(T, 16), layer.resolve_knobs(), plan, gate, wg,
                                      layer.experts.stored_weights())
    C = 2 * -(-T // E)   # cf=1's capacity
    assert call() == ("slots",) and slotted[-1][0] == C and slotted[-1][1] is monitor._host
    monitor._count[0] = 1024 // 2                      # half the rows in fix-up tiles: grouped
    call()
    assert grouped == [-1] and measured == [(C, 128, T * k, monitor._host)]
    monitor._count[0] = 1024 // 8
    assert call() == ("slots",) and len(grouped) == 1 and len(measured) == 1


def _repeat_setup(monkeypatch):
    """A layer, tokens and a RepeatCall made as forward makes one, with the launch stubbed (no
    extension on CPU): repeat() returns "launched" when it would serve the call."""
    layer = make_layer()
    x = torch.randn(6, 16)
    knobs = layer.resolve_knobs()
    plan = native_forward._signature_plan(layer, x, _FakeNative(), 0, 2, False)
    call = native_forward.RepeatCall(layer, x, knobs, plan)
    monkeypatch.setattr(native_forward, "_launch", lambda *args: "launched")
    return layer, x, call


def test_repeat_serves_calls_the_full_path_would_decide_alike(monkeypatch):
    layer, x, call = _repeat_setup(monkeypatch)
    with torch.no_grad():
        assert native_forward.repeat(layer, call, x) == "launched"
        assert native_forward.repeat(layer, call, torch.randn(1, 16)) == "launched"   # any token count
        assert native_forward.repeat(layer, call, torch.randn(0, 16)) == "launched"


@pytest.mark.parametrize("change", ["grad", "3d", "dtype", "model_dim", "train", "switched_off", "dense_off",
                                    "new_expert_weight", "new_gate_weight", "new_gate", "experts_to_half", "list"])
def test_repeat_declines_whatever_the_full_path_would_decide_anew(monkeypatch, change):
    """Each change sends the call down the full path (checks, flattening, plan), nothing launched."""
    layer, x, call = _repeat_setup(monkeypatch)
    grad = change == "grad"
    if change == "3d":
        x = x.reshape(2, 3, 16)
    elif change == "dtype":
        x = x.double()
    elif change == "model_dim":
        x = torch.randn(6, 15)
    elif change == "train":
        layer.train()
    elif change == "switched_off":
        monkeypatch.setattr(native_forward, "_enabled", False)
    elif change == "dense_off":
        monkeypatch.setattr(native_forward, "_dense_enabled", False)
    elif change == "new_expert_weight":
        layer.experts.batched_fc1_w = torch.nn.Parameter(layer.experts.batched_fc1_w.detach().clone())
    elif change == "new_gate_weight":
        layer.gates[0].wg.weight = torch.nn.Parameter(layer.gates[0].wg.weight.detach().clone())
    elif change == "new_gate":
        layer.gates[0] = type(layer.gates[0])(16, 4, fp32=False)
    elif change == "experts_to_half":
        layer.experts.half()   # in place: same parameter objects, another dtype
    elif change == "list":
        x = [x]
    with torch.set_grad_enabled(grad):
        assert native_forward.repeat(layer, call, x) is None


def test_forward_remembers_no_call_the_native_path_did_not_serve():
    layer = make_layer()
    with torch.no_grad():
        layer(torch.randn(5, 16))
        layer(torch.randn(5, 16), capacity_factor=0.0)
    assert not layer.__dict__.get("_repeat_calls")


def test_copies_of_a_remembered_call_look_their_triton_variants_up_anew():
    """RepeatCall.kernels holds this process's registry lists: copies and pickles carry None (the
    launch looks the variants up per call), everything else is carried."""
    import copy
    import pickle
    call = object.__new__(native_forward.RepeatCall)
    for name in native_forward.RepeatCall.__slots__:
        setattr(call, name, name)
    call.kernels = native_forward.TritonKernels([1, 2], ([3], [4]), ([], []))
    for clone in (copy.deepcopy(call), pickle.loads(pickle.dumps(call))):
        assert clone.kernels is None
        assert all(getattr(clone, n) == n for n in native_forward.RepeatCall.__slots__ if n != "kernels")
