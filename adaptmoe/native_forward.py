"""The no-grad forward of a single-process layer as one native call (``native/layer_forward.cpp``).

Legend: T tokens, D model dim, E experts, K top-k, R rows of the expert-major buffer, O output dim.

Why: an eager inference call spends most of its host time in Python before the first expert GEMM
is enqueued (H100 machine, fine-grained 64-expert layer: ~220 us of host time against ~45 us of
GPU work in front of that GEMM, ``docs/results/2026-11-22/h100_isolated_call_stamps.log``), so
the GPU idles; serving with batch sizes that change every call cannot hide that behind a CUDA
graph. The native call enqueues gate GEMM, routing, dispatch, FFN and combine back to back:
60-150 us less host time per call there (``scripts/ab_native_forward.py``; each ATen call still
costs ~15-20 us of host time on that machine's CPU, so the Python around the call was not all of it).

The Python path stays the reference: this module only decides whether the native call computes
what the Python path would, and packages its outputs the way the Python path does;
``native_forward_blocker`` says why a call cannot be served (the layer then runs the Python
path). Op for op the same, except: large dropless calls of relu experts of up to
``ops._triton_gemm.MAX_EXPERT_WEIGHTS`` weights, and large capacity calls of relu experts of up
to ``_CAPACITY_GATHER_MAX_WEIGHTS``, gather their rows inside a Triton first GEMM
(``gathered_fc1_blocker``), which rounds its own way (launched from inside the native call once
Triton has compiled and launched it once: ``ops._triton_native``); such dropless calls run in
cf=1's capacity slots (``NativeForwardPlan.slotted``: cuBLAS's batched second GEMM instead of
torch's grouped one, and Triton row kernels recompute the rows that overflow into other experts'
slots; H100, balanced, graphed: fine-grained 1.031 vs 1.081 ms, DeepSeek-V3 13.01 vs 13.46;
random routing a tie: ``docs/results/2026-11-23/h100_ab_slotted_session12.log``; a layer whose
last call would have spent over ``MAX_FIXUP_SHARE`` of its rows on fix-ups runs grouped), and so do dropless
calls of larger relu experts, dispatched into the slots for cuBLAS's batched GEMMs (Mixtral,
balanced: 5.97 vs 6.10 ms eager, 5.76 vs 5.97 graphed; random 6.41 vs 6.60,
``h100_ab_slotted_mixtral_session12.log``); calls where every token goes to every
expert (k == E, post-scored, nothing dropped) skip the dispatch, with one first GEMM over the
tokens for all experts enqueued before the gate (the same products through GEMMs of other
shapes); a gshard loss alone is computed inside the native call (fp32 sums in its own order).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .experts import FFNExperts
from .gates import LinearGate
from .ops import _fused_gemm, _native, _triton_gemm
from .ops._triton_slotted import OverflowMonitor
from .ops._decode_op import ACTIVATION_CODES, activation_code
from .routing import Routing, capacity_for, fusable_gate

_enabled = True
_gathered_enabled = True
_dense_enabled = True
_slotted_enabled = True
_triton_from_native = True
_RELU = ACTIVATION_CODES["relu"]
# Calls of fewer R*(D+H) elements (dispatch + relu traffic the gathered GEMM saves) take the
# padded/grouped path. Since the Triton GEMM is launched from inside the native call, the gathered
# path wins at every size measured (H100, fine-grained dropless, balanced, isolated calls: T=1024
# 0.370 vs 0.424 ms, 2048 0.440 vs 0.514, 4096 0.684 vs 0.782; R*(D+H) = 2.5e7 at T=1024); below
# that it is unmeasured, so the smallest measured size is the bound.
_GATHER_MIN_ELEMENTS = 1 << 24
# H*D of one expert's first matrix up to which capacity (cf != 0) calls gather their padded rows in
# the Triton first GEMM instead of a dispatch pass and cuBLAS's batched GEMM (H100, balanced, first
# GEMM graphed, scripts/explore_capacity_gathered.py: fine-grained 1024x2048 experts 0.457 vs
# 0.488 ms; DeepSeek-V3's 2048x7168 6.04 vs 5.99, where cuBLAS's tiles win).
_CAPACITY_GATHER_MAX_WEIGHTS = 1 << 22


def set_enabled(enabled: bool) -> None:
    """Turns the one-call native forward off (the Python path runs) or back on, e.g. for A/B runs."""
    global _enabled
    _enabled = bool(enabled)


def set_triton_from_native(enabled: bool) -> None:
    """Whether the gathered dropless path's Triton GEMM may be launched from inside the native call
    (else always from Python, between two native calls), e.g. for A/B runs."""
    global _triton_from_native
    _triton_from_native = bool(enabled)


@dataclass(frozen=True)
class NativeForwardPlan:
    """What one native call needs beyond the tensors: decided once per layer and signature."""

    score_fn: int          # 0 softmax, 1 sigmoid (the kernels' codes)
    normalize: bool        # renormalise the k weights (only when k > 1)
    activation: int        # Activation code of native/moe_kernels.h
    relu_epilogue: bool    # relu inside the first GEMM (capacity layout, plain FFN)
    grouped: bool          # dropless rows through the grouped GEMM (else a padded batch)
    gathered_fc1: bool = False   # the first GEMM gathers its rows (Triton, no dispatch; with capacity: padded rows)
    gshard_loss: bool = False    # the gate's only loss is gshard: the native call computes it
    dense: bool = False          # k == E, post-scored: calls that drop nothing skip the dispatch
    slotted: bool = False        # dropless rows in cf=1's capacity slots, overflow rows fixed up


def native_forward_blocker(layer, x_TD: Tensor, knobs) -> str | None:
    """Why one native call cannot serve this forward, or None when it can."""
    plan = _plan_or_reason(layer, x_TD, knobs)
    return plan if isinstance(plan, str) else None


def plan_for(layer, x_TD: Tensor, knobs) -> NativeForwardPlan | None:
    """The plan of a native call for this forward, or None when the Python path must run it.
    Knobs chosen by the planner (plan='auto') are served like explicit ones: in one process the
    planner's choices do not change the path, and its warmup then times what later calls run."""
    plan = _plan_or_reason(layer, x_TD, knobs)
    return None if isinstance(plan, str) else plan


def _plan_or_reason(layer, x_TD: Tensor, knobs) -> NativeForwardPlan | str:
    # Per-call conditions first (cheap), then the per-signature ones, cached on the layer.
    if not _enabled:
        return "turned off by adaptmoe.native_forward.set_enabled(False)"
    if torch.is_grad_enabled():
        return "gradients are being recorded (the Python path's ops carry the backward)"
    if not x_TD.is_cuda:
        return "not a CUDA tensor"
    if torch.compiler.is_compiling():
        return "traced call (torch.compile traces the registered ops instead)"
    if torch.is_autocast_enabled("cuda"):
        return "autocast is on (it decides operand dtypes per op)"
    native = _native.loaded() or _native.for_tensor(x_TD)
    if native is None or not hasattr(native, "moe_forward_nograd"):
        return f"native extension unavailable or older than this module: {_native.status()}"
    dropless = knobs.capacity_factor == 0
    key = (knobs.gate_index, knobs.top_k, dropless, layer.training, x_TD.dtype, x_TD.device, _fused_gemm._enabled,
           _gathered_enabled, _dense_enabled, _slotted_enabled)
    cache = layer.__dict__.setdefault("_native_forward_plans", {})
    plan = cache.get(key)
    if plan is None:
        plan = cache[key] = _signature_plan(layer, x_TD, native, knobs.gate_index, knobs.top_k, dropless)
    return plan


def _signature_plan(layer, x_TD: Tensor, native, gate_index: int, top_k: int,
                    dropless: bool) -> NativeForwardPlan | str:
    if layer.layout.world_size != 1:
        return "more than one process (the parallel executor runs it)"
    gate, gate_cfg, experts = layer.gates[gate_index], layer.config.gates[gate_index], layer.experts
    if type(gate) is not LinearGate:
        return f"gate kind {gate_cfg.kind!r} (one linear projection only)"
    if not fusable_gate(gate_cfg, layer.training) or (layer.training and gate_cfg.noise_std > 0):
        return "the gate needs the unfused selection (batch priority, activation after top-k, noise or dropout)"
    if type(experts) is not FFNExperts:
        return "custom experts"
    act = activation_code(experts.activation)
    if act is None:
        return "custom activation"
    if x_TD.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {x_TD.dtype} (float32, float16 or bfloat16)"
    w = experts.stored_weights()
    if any(t is not None and t.dtype != x_TD.dtype for t in w):
        return "expert weights and tokens differ in dtype"
    E = layer.config.num_experts
    if E > min(native.max_topk_experts, native.max_locate_experts):
        return f"{E} experts (native routing takes up to {native.max_topk_experts})"
    grouped = dropless and top_k != E   # k == E: every expert gets all T rows, a padded batch
    if grouped:
        from .expert_compute import _grouped_mm_usable
        if x_TD.dtype != torch.bfloat16 or not _grouped_mm_usable(x_TD, w):
            return "dropless rows outside bf16 grouped GEMM (sm90+, D, H, O multiples of 8)"
    max_gathered = (_triton_gemm.MAX_EXPERT_WEIGHTS if grouped else
                    _CAPACITY_GATHER_MAX_WEIGHTS if not dropless and top_k != E else 0)
    gathered = (_gathered_enabled and w.w3_eHD is None and w.b2_eO is None and layer.config.is_postscore
                and w.w1_eHD.shape[1] * w.w1_eHD.shape[2] <= max_gathered
                and _triton_gemm.gathered_fc1_blocker(x_TD, w.w1_eHD, w.b1_eH, act == _RELU) is None)
    fusable_relu = (w.w3_eHD is None and _fused_gemm.fused_ffn_blocker(x_TD.unsqueeze(0), w.w1_eHD, w.b1_eH, w.w2_eHO,
                                                                       experts.activation) is None)
    slotted = (_slotted_enabled and grouped and fusable_relu and w.b2_eO is None and layer.config.is_postscore
               and _slot_fixups_fit(x_TD, w))
    return NativeForwardPlan(score_fn=1 if gate_cfg.kind in ("sigmoid", "sinkmoid") else 0,
                             normalize=gate_cfg.normalize_topk and top_k > 1, activation=act,
                             relu_epilogue=not grouped and fusable_relu, grouped=grouped, gathered_fc1=gathered,
                             slotted=slotted,
                             gshard_loss=tuple(kind for kind in gate_cfg.losses if kind != "none") == ("gshard",),
                             dense=_dense_enabled and top_k == E and layer.config.is_postscore)


def _slot_fixups_fit(x_TD: Tensor, w) -> bool:
    """Whether the row kernel takes both expert matrices (the slotted layouts' fix-ups)."""
    _, H, D = w.w1_eHD.shape
    O = w.w2_eHO.shape[2]
    return (_triton_gemm.kernel_blocker(x_TD, (w.w1_eHD, w.b1_eH), reduced=(D,), produced=(H,)) is None
            and _triton_gemm.kernel_blocker(x_TD, (w.w2_eHO,), reduced=(H,), produced=(O,)) is None)


def run(layer, x_TD: Tensor, knobs, plan: NativeForwardPlan) -> tuple[Tensor, Routing, tuple | None, dict | None]:
    """(y_TO, routing, loss inputs, losses): what ``MoELayer._route`` and ``_run`` return, from
    one native call, and the call's losses when the native call computed them (``plan.gshard_loss``;
    the loss inputs are then None), else None and (clean logits, noisy logits, scores) for
    ``MoELayer._losses``."""
    gate, wg_ED = _gate_of(layer, knobs.gate_index)
    return _launch(layer, x_TD, knobs, plan, gate, wg_ED, layer._modules["experts"].stored_weights())


class RepeatCall:
    """A layer's native call remembered for later calls with the same knob arguments
    (``MoELayer.forward`` keeps one per argument tuple): its knobs and plan, and everything the
    full path read to decide them, so that a later call is served by ``repeat`` after a few
    reads instead of the knob checks, input flattening and plan lookup. Why: an isolated call's
    GPU waits for every line of Python in front of the native call, and right after a sync the
    host runs them several times slower than in a warm loop (README bf16 layer on the H100
    machine: the layer's Python around the native call cost 43-65 us of such a call's time,
    ``docs/results/2026-11-22/h100_isolated_native_call_session9.log``)."""

    __slots__ = ("knobs", "plan", "model_dim", "dtype", "device_index", "training", "settings", "experts", "params",
                 "weights", "gate", "gate_linear", "wg_ED", "gate_key", "kernels")

    def __init__(self, layer, x_TD: Tensor, knobs, plan: NativeForwardPlan):
        self.knobs, self.plan = knobs, plan
        self.model_dim, self.dtype, self.device_index = layer.config.model_dim, x_TD.dtype, x_TD.get_device()
        self.training, self.settings = layer.training, _settings()
        self.experts = layer._modules["experts"]
        self.params = tuple(self.experts._parameters.values())
        self.weights = self.experts.stored_weights()
        self.gate, self.wg_ED = _gate_of(layer, knobs.gate_index)
        self.gate_linear = self.gate._modules["wg"]
        self.gate_key = str(knobs.gate_index)
        self.kernels = _triton_kernels(x_TD, plan, self.weights)

    def __getstate__(self) -> dict:
        # Copies and pickles look their Triton variants up anew (kernels None): registry ids belong
        # to this process, and the registry's live lists should not be frozen into copies.
        return {name: (None if name == "kernels" else getattr(self, name)) for name in self.__slots__}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value)

    def modules_unchanged(self, layer) -> bool:
        """The same experts and gate modules holding the same parameter objects (parameters
        converted in place, ``module.to(...)``, keep their identity: ``repeat`` checks the dtype)."""
        params = self.experts._parameters
        return (layer._modules["experts"] is self.experts and len(params) == len(self.params)
                and all(map(operator.is_, params.values(), self.params))
                and layer._modules["gates"]._modules[self.gate_key] is self.gate
                and self.gate._modules["wg"] is self.gate_linear
                and self.gate_linear._parameters["weight"] is self.wg_ED)


def repeat(layer, call: RepeatCall, x: Tensor) -> tuple | None:
    """``run``'s result for tokens ``x`` given to a call with ``call``'s knob arguments, when
    ``_plan_or_reason`` and ``MoELayer._tokens_of`` would decide as they did for it (same
    switches, grad and autocast off, x a 2-D tensor of model_dim columns in the experts' dtype on
    the same device, same training flag, same modules and parameters); else None and nothing ran.
    Any token count: the capacity is recomputed per call. Never reached while dynamo traces
    (``MoELayer._memo_key`` is None then)."""
    if (type(x) is not Tensor or torch.is_grad_enabled() or x.dim() != 2 or x.shape[1] != call.model_dim
            or x.dtype is not call.dtype or x.get_device() != call.device_index or layer.training is not call.training
            or call.settings != _settings() or torch.is_autocast_enabled("cuda")
            or not call.modules_unchanged(layer) or call.weights.w1_eHD.dtype is not x.dtype):
        return None
    return _launch(layer, x, call.knobs, call.plan, call.gate, call.wg_ED, call.weights, call.kernels)


def _settings() -> tuple:
    """The switches a plan depends on (``_plan_or_reason``'s first checks and its cache key)."""
    return (_enabled, _native.loaded() is not None, _fused_gemm._enabled, _gathered_enabled, _dense_enabled,
            _slotted_enabled)


class TritonKernels(NamedTuple):
    """The registered variants (extension ids, ``_triton_gemm.rows_variants``) a plan's native calls
    pick their Triton kernels from: the gathered first GEMM, the fix-ups of the gathered slotted
    call, those of the dispatched slotted call. The registry's own lists, which grow as Python
    launches register variants, so a RepeatCall keeps them: each lookup cost ~1.5 us of host time
    in front of the launch."""
    gathered_fc1: list
    gathered_fixups: tuple[list, list]
    dispatched_fixups: tuple[list, list]


def _triton_kernels(x_TD: Tensor, plan: NativeForwardPlan, w) -> TritonKernels | None:
    """The plan's TritonKernels, or None for plans that launch no Triton kernel."""
    if not (plan.gathered_fc1 or plan.slotted):
        return None
    none = ([], [])
    return TritonKernels(
        _triton_gemm.gathered_fc1_variants(x_TD, w.w1_eHD, w.b1_eH) if plan.gathered_fc1 else [],
        _triton_gemm.slot_fixup_variants(x_TD, w.w1_eHD, w.b1_eH, w.w2_eHO) if plan.gathered_fc1 and plan.slotted
        else none,
        _triton_gemm.slot_fixup_variants(x_TD, w.w1_eHD, w.b1_eH, w.w2_eHO, gathered=False) if plan.slotted else none)


def _launch(layer, x_TD: Tensor, knobs, plan: NativeForwardPlan, gate, wg_ED: Tensor, w,
            kernels: TritonKernels | None = None) -> tuple:
    """``run`` with the gate module, its weight and the experts' weights read (and the plan's
    TritonKernels when known: else looked up where needed)."""
    T = x_TD.shape[0]
    E, k = layer.config.num_experts, knobs.top_k
    capacity = capacity_for(knobs.capacity_factor, T, E, k)
    slots = _slot_choice(layer, capacity_for(1.0, T, E, k)) if plan.slotted and capacity is None and T else None
    in_slots = slots is not None and slots.take
    slot_capacity, share = (slots.capacity, slots.share) if in_slots else (None, None)
    if (plan.gathered_fc1 and T * k * (w.w1_eHD.shape[1] + w.w1_eHD.shape[2]) >= _GATHER_MIN_ELEMENTS
            and capacity != 0):
        result = _run_gathered(layer, x_TD, knobs, plan, gate, wg_ED, w, capacity, slot_capacity, share,
                               kernels=kernels)
    elif in_slots:
        result = _run_slotted(layer, x_TD, knobs, plan, gate, wg_ED, w, slot_capacity, share, kernels=kernels)
    else:
        dense = plan.dense and T > 0 and (capacity is None or capacity >= T)   # then no choice drops
        outputs = _native.loaded().moe_forward_nograd(
            x_TD, wg_ED, gate.fp32, k, plan.score_fn, plan.normalize, -1 if capacity is None else capacity,
            layer.config.is_postscore, plan.grouped, w.w1_eHD, w.w2_eHO, w.w3_eHD, w.b1_eH, w.b2_eO, plan.activation,
            plan.relu_epilogue, x_TD.dtype is torch.float32 and torch.backends.cuda.matmul.allow_tf32,
            plan.gshard_loss, dense)   # (the TF32 flag only matters for float32; reading it costs ~0.6 us)
        result = _packaged(outputs, capacity, T * k if capacity is None else E * capacity, plan)
    if slots is not None and not in_slots and slots.share is not None:   # measured off the slots too
        _measure_share(result[1].counts_E, slots.capacity, T * k, slots.share)
    return result


# A dropless no-grad call runs in cf=1's capacity slots while the last call measured would have
# spent at most this share of its routed rows on fix-ups (each overflowing expert's rows rounded up
# to the row kernel's tile); else in grouped rows. H100, interleaved, random routing: fine-grained
# (~12% of rows in fix-up tiles) and DeepSeek-V3 (~25%) tie with the grouped layout or beat it
# (h100_ab_slotted_session12.log); a routing that sends every token to a few experts puts nearly all
# rows in fix-ups: up to twice the GEMM work.
MAX_FIXUP_SHARE = 1 / 4


class SlotChoice(NamedTuple):
    """A dropless call's slot layout: cf=1's capacity, whether this call takes it, and the
    layer's pinned count that this call's layout (or a measurement) writes for the next call's
    choice (None where it cannot be written, e.g. while a CUDA graph is captured)."""
    capacity: int
    take: bool
    share: Tensor | None


def _slot_choice(layer, slot_capacity: int) -> SlotChoice:
    monitor = layer.__dict__.get("_forward_slot_monitor")
    if monitor is None:
        monitor = layer.__dict__["_forward_slot_monitor"] = OverflowMonitor()
    share = monitor.host_count(_native.loaded())
    return SlotChoice(slot_capacity, monitor.prefer_slots(1024, MAX_FIXUP_SHARE), share)


def _measure_share(counts_E: Tensor, slot_capacity: int, rows: int, share: Tensor) -> None:
    """The fix-up share a slot layout of these counts would cost, into the monitor's pinned count."""
    _native.loaded().overflow_fixup_share(counts_E, slot_capacity, _triton_gemm.ROWS_TILES.m, rows, share)


def _packaged(outputs: list, capacity: int | None, num_rows: int, plan: NativeForwardPlan) -> tuple:
    """run's result from a native forward's (y_TO, logits_TE, indices_TK, weights_TK, scores_TE,
    locations_TK, counts_E, slots_TK, loss)."""
    y_TO, logits_TE, indices_TK, weights_TK, scores_TE, locations_TK, counts_E, slots_TK, loss = outputs
    routing = Routing(indices_TK, weights_TK, locations_TK, counts_E, capacity, slots_TK, num_rows)
    return (y_TO, routing) + _losses_or_inputs(logits_TE, scores_TE, loss, plan)


def _gate_of(layer, gate_index: int) -> tuple:
    """(gate module, its weight (E, D)) read through the modules' dicts: each nn.Module attribute
    read costs ~1 us of host time (ModuleList indexing ~2), time an isolated call's GPU waits."""
    gate = layer._modules["gates"]._modules[str(gate_index)]
    return gate, gate._modules["wg"]._parameters["weight"]


def _run_gathered(layer, x_TD: Tensor, knobs, plan: NativeForwardPlan, gate, wg_ED: Tensor, w,
                  capacity: int | None, slot_capacity: int | None, share: Tensor | None = None,
                  kernels: TritonKernels | None = None) -> tuple:
    """Relu experts whose first GEMM gathers its rows from the tokens, relu in its epilogue
    (``ops._triton_gemm``; ``gathered_fc1_blocker`` says which): native routing, that GEMM over
    the grouped rows then the grouped second GEMM (dropless, capacity None), or over the padded
    rows (every expert ``capacity`` of them) then the batched one, or, dropless in
    ``slot_capacity`` slots per expert, both GEMMs over the slots and the rows that overflowed
    into other experts' slots recomputed (``_triton_gemm.slot_fixups``); native combine. One
    native call when registered variants of the Triton kernels fit this call's arguments; else
    they are launched from Python (where Triton's launcher registers the variants it ran for the
    next calls). ``share``: the slot monitor's pinned count, written with this call's fix-up share."""
    T, k = x_TD.shape[0], knobs.top_k
    native = _native.loaded()
    native_capacity = -1 if capacity is None else capacity
    native_slots = -1 if slot_capacity is None else slot_capacity
    # Compiled variants of the Triton kernels that Python's launches registered: the native call
    # launches the first whose specialization its own arguments satisfy (ops._triton_native).
    if _triton_from_native:
        kernels = kernels or _triton_kernels(x_TD, plan, w)
        variants = kernels.gathered_fc1
        fixups = kernels.gathered_fixups if slot_capacity is not None else ([], [])
        if variants and (slot_capacity is None or all(fixups)):
            outputs = native.moe_forward_nograd_gathered(
                x_TD, wg_ED, gate.fp32, k, plan.score_fn, plan.normalize, w.w1_eHD, w.w2_eHO, w.b1_eH, variants,
                plan.gshard_loss, native_capacity, native_slots, *fixups, share)
            if outputs:
                return _packaged(outputs, capacity, _routed_rows(T, k, layer.config.num_experts, capacity), plan)
    routed = native.moe_route_nograd(x_TD, wg_ED, gate.fp32, k, plan.score_fn, plan.normalize, native_capacity,
                                     native_slots)
    logits_TE, indices_TK, weights_TK, scores_TE, locations_TK, counts_E, slots_TK, inv_R = routed[:8]
    if share is not None:
        _measure_share(counts_E, slot_capacity, T * k, share)
    y_TO = _gathered_experts(x_TD, w, k, capacity, slot_capacity, weights_TK, counts_E, slots_TK, inv_R, routed[8:])
    # Last, like inside the one-call path: nothing in front of the expert GEMMs waits for it.
    loss = native.gshard_loss(scores_TE, indices_TK, plan.score_fn == 1) if plan.gshard_loss else None
    return _packaged([y_TO, logits_TE, indices_TK, weights_TK, scores_TE, locations_TK, counts_E, slots_TK, loss],
                     capacity, _routed_rows(T, k, layer.config.num_experts, capacity), plan)


def _run_slotted(layer, x_TD: Tensor, knobs, plan: NativeForwardPlan, gate, wg_ED: Tensor, w,
                 slot_capacity: int, share: Tensor | None = None, kernels: TritonKernels | None = None) -> tuple:
    """Dropless relu experts (any size) in cf=1's capacity slots: native routing and slot layout,
    the tokens dispatched into the slots, cuBLAS's batched GEMMs over them (relu in the first's
    epilogue), the overflow rows recomputed (``_triton_gemm.slot_fixups``), native combine. One
    native call (``moe_forward_nograd_slotted``) when registered variants of the two fix-up
    kernels fit; else the same steps from Python, whose Triton launches register them."""
    T, k = x_TD.shape[0], knobs.top_k
    native = _native.loaded()
    fixups = (kernels or _triton_kernels(x_TD, plan, w)).dispatched_fixups if _triton_from_native else ([], [])
    if all(fixups):
        outputs = native.moe_forward_nograd_slotted(x_TD, wg_ED, gate.fp32, k, plan.score_fn, plan.normalize, True,
                                                    w.w1_eHD, w.w2_eHO, w.b1_eH, slot_capacity, plan.gshard_loss,
                                                    *fixups, share)
        if outputs:
            return _packaged(outputs, None, T * k, plan)
    routed = native.moe_route_nograd(x_TD, wg_ED, gate.fp32, k, plan.score_fn, plan.normalize, -1, slot_capacity)
    logits_TE, indices_TK, weights_TK, scores_TE, locations_TK, counts_E, slots_TK = routed[:7]
    slots_S, rows_O, _, over_E, _ = routed[8:]
    if share is not None:
        _measure_share(counts_E, slot_capacity, T * k, share)
    (E, H, D), C = w.w1_eHD.shape, slot_capacity
    x_SD = native.scatter_rows(x_TD, slots_S, E * C, None, None)[0]
    h_SH = _fused_gemm.fc1_relu(x_SD.view(E, C, D), w.w1_eHD, w.b1_eH).view(E * C, H)
    fixup_args = (w.w1_eHD, w.b1_eH, w.w2_eHO, 1, over_E, rows_O, None)
    _triton_gemm.slot_fixups(x_SD, h_SH, None, *fixup_args, second=False)
    y_SO = torch.bmm(h_SH.view(E, C, H), w.w2_eHO).view(E * C, -1)
    _triton_gemm.slot_fixups(x_SD, h_SH, y_SO, *fixup_args, second=True)
    y_TO = native.gather_rows(y_SO, slots_S, weights_TK, None)[0]
    loss = native.gshard_loss(scores_TE, indices_TK, plan.score_fn == 1) if plan.gshard_loss else None
    return _packaged([y_TO, logits_TE, indices_TK, weights_TK, scores_TE, locations_TK, counts_E, slots_TK, loss],
                     None, T * k, plan)


def _routed_rows(T: int, k: int, E: int, capacity: int | None) -> int:
    """The Routing's num_rows: T*k grouped rows (dropless), else E * capacity."""
    return T * k if capacity is None else E * capacity


def _gathered_experts(x_TD: Tensor, w, k: int, capacity: int | None, slot_capacity: int | None, weights_TK: Tensor,
                      counts_E: Tensor, slots_TK: Tensor, inv_R: Tensor, layout: list) -> Tensor:
    """``_run_gathered``'s expert GEMMs and combine launched from Python, after
    ``moe_route_nograd`` (``layout``: its slot layout's outputs past inv_R, when slotted)."""
    native, E = _native.loaded(), w.w1_eHD.shape[0]
    num_rows = inv_R.numel()
    if num_rows == 0:
        return x_TD.new_zeros(x_TD.shape[0], w.w2_eHO.shape[2])
    if slot_capacity is not None:
        slots_TK, rows_O, choice_O, over_E, capacity_E = layout
        h_SH = _triton_gemm.gathered_fc1_relu(x_TD, inv_R, k, capacity_E, w.w1_eHD, w.b1_eH)
        fixup_args = (w.w1_eHD, w.b1_eH, w.w2_eHO, k, over_E, rows_O, choice_O)
        _triton_gemm.slot_fixups(x_TD, h_SH, None, *fixup_args, second=False)
        y_RO = torch.bmm(h_SH.view(E, slot_capacity, -1), w.w2_eHO).view(num_rows, -1)
        _triton_gemm.slot_fixups(x_TD, h_SH, y_RO, *fixup_args, second=True)
    else:
        rows_E = counts_E if capacity is None else torch.full_like(counts_E, capacity)
        h_RH = _triton_gemm.gathered_fc1_relu(x_TD, inv_R, k, rows_E, w.w1_eHD, w.b1_eH)
        if capacity is None:
            y_RO = torch._grouped_mm(h_RH, w.w2_eHO, offs=torch.cumsum(counts_E, 0, dtype=torch.int32))
        else:   # rows no choice feeds (computed from token 0) are never gathered
            y_RO = torch.bmm(h_RH.view(E, capacity, -1), w.w2_eHO).view(num_rows, -1)
    return native.gather_rows(y_RO, slots_TK, weights_TK, None)[0]


def _losses_or_inputs(logits_TE: Tensor, scores_TE: Tensor, loss: Tensor | None,
                      plan: NativeForwardPlan) -> tuple[tuple | None, dict | None]:
    """(None, the native call's losses) when it computed them, else ((clean logits, noisy logits,
    probabilities), None): no noise here, and the balance losses read per-token probabilities,
    as routing.fused_routing returns them."""
    if plan.gshard_loss:
        return None, {"gshard": loss}
    probs_TE = scores_TE / scores_TE.sum(dim=1, keepdim=True).clamp(min=1e-9) if plan.score_fn == 1 else scores_TE
    return (logits_TE, logits_TE, probs_TE), None


def set_dense_enabled(enabled: bool) -> None:
    """Turns the dense layout of k == E calls off (tokens are dispatched into the padded batch
    like any other call) or back on, e.g. for A/B runs."""
    global _dense_enabled
    _dense_enabled = bool(enabled)


def set_slotted_enabled(enabled: bool) -> None:
    """Turns the slotted layout of dropless calls off (their rows are grouped and the second GEMM
    is torch's grouped one) or back on, e.g. for A/B runs."""
    global _slotted_enabled
    _slotted_enabled = bool(enabled)


def set_gathered_enabled(enabled: bool) -> None:
    """Turns the gathered Triton first GEMM off (dropless rows are dispatched, then grouped_mm and
    a relu pass run) or back on, e.g. for A/B runs."""
    global _gathered_enabled
    _gathered_enabled = bool(enabled)


__all__ = ["NativeForwardPlan", "RepeatCall", "native_forward_blocker", "plan_for", "repeat", "run",
           "set_dense_enabled", "set_enabled", "set_gathered_enabled", "set_slotted_enabled"]
