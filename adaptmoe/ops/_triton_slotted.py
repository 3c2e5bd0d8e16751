"""Dropless expert GEMMs in capacity slots: cuBLAS batched GEMMs plus Triton fix-ups for the rows
that overflow their expert.

Legend: T tokens, D model dim, H hidden, E experts, K top-k, C slots per expert (cf=1's capacity),
S = E*C slot rows, O overflow rows (``routing.OverflowSlots``), N / KD a GEMM's output / reduced dim.

Why: on balanced routing a dropless training step on ``torch._grouped_mm`` ran 7-8% slower than
cf=1's padded batched matmuls (H100, bf16: DeepSeek-V3 45.1 vs 41.9 ms, Mixtral 19.5 vs 18.0;
``h100_bench_layer_session7_balanced_30ec3e7.log``): grouped_mm's GEMMs trail cuBLAS's batched
ones by ~7% at the same sizes, which is all of the gap (``h100_ab_dropless_train_dsv3_profile.log``),
and our Triton kernels trail cuBLAS as much. Here every expert's first C rows sit in its own
slots and the rest in slots other experts leave free, so the GEMMs run as cuBLAS bmm over
exactly cf=1's shapes. Overflow rows are then computed with their slot owner's weights; Triton
kernels recompute them with their own expert's and write them back in place (outputs and input
gradients), and the weight gradients take off what each overflow row added to its slot owner's
and add it to its own expert's. Those kernels loop over the overflow rows only (counts on the
GPU, no host sync): with no overflow they cost a few launches; their cost grows with the number
of experts they touch, so a layer takes this path only while its last call touched few
(``OverflowMonitor``; ``FFNExperts.slot_layout``).

One autograd node per GEMM, like cf=1's bmm, activation, bmm graph (any elementwise activation,
gated or not, sits between them unchanged), so activations are freed exactly when cf=1 frees
them (a single node for the whole FFN keeps them to its end: +0.4-2.3 GiB peak, ``_fused_gemm``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..routing import OverflowSlots, Routing
from . import _fused_gemm, _native
from . import _triton_gemm as tg


def blocker(x_SD: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...]) -> str | None:
    """Why ``slotted_bmm`` cannot serve these expert weights (each [E, H, D] or [E, H, O]), or None."""
    if any(b is not None for b in biases):
        return "expert biases are not wired (their rows would need the owner's and the true expert's bias)"
    if torch.compiler.is_compiling():
        return "under torch.compile the traceable grouped_mm path serves"
    native = _native.for_tensor(x_SD)
    if native is None or not hasattr(native, "overflow_layout"):
        return f"native extension (its slot layout kernel) unavailable: {_native.status()}"
    dims = {d for w in weights for d in w.shape[1:]}
    return tg.kernel_blocker(x_SD, weights, reduced=tuple(dims), produced=tuple(dims))


def layout_on_gpu(routing: Routing, capacity: int,
                  monitor: "OverflowMonitor | None" = None) -> tuple[OverflowSlots, Tensor]:
    """(``routing.overflow_slots(routing, capacity)``, how many experts it touches) in one native
    launch (``launch_overflow_layout``) instead of ~15 torch ops (~0.3 ms of host time on the H100
    machine), the count also written for ``monitor``. Needs E * capacity >= T * K (the caller's
    capacity is cf=1's, which always holds)."""
    native = _native.loaded()
    slots_TK, rows_O, over_E, hosted_E, touched = native.overflow_layout(
        routing.indices_TK, routing.locations_TK, routing.counts_E, capacity,
        None if monitor is None else monitor.host_count(native))
    return OverflowSlots(slots_TK, rows_O, over_E, hosted_E, capacity), touched


def slotted_bmm(a_SK: Tensor, w_E: Tensor, transpose_w: bool, layout: OverflowSlots, relu: bool = False) -> Tensor:
    """c_SN[s] = a_SK[s] @ W_e for every slot row s, e the expert the row belongs to (its slot's
    owner, or its own expert for overflow rows); W_e = w_E[e]^T if ``transpose_w`` (w_E is
    [E, N, KD]) else w_E[e] ([E, KD, N]). Differentiable in a and w. ``relu`` (transpose_w only):
    relu(c) from the GEMMs' epilogues (cuBLASLt's and the fix-up's), whose backward takes the
    gradient already masked by relu's (``ops._fused_gemm.relu_of`` on the output)."""
    return _SlottedBmm.apply(a_SK, w_E, transpose_w, layout.rows_O, layout.over_E, layout.hosted_E, relu)


def _bmm(a_SK: Tensor, w_E: Tensor, transpose_w: bool) -> Tensor:
    E = w_E.shape[0]
    w = w_E.transpose(1, 2) if transpose_w else w_E
    return torch.bmm(a_SK.view(E, -1, a_SK.shape[1]), w).view(a_SK.shape[0], -1)


def _fixup_variants(a: Tensor, w_E: Tensor, transpose_w: bool, relu: bool) -> list[int]:
    """Registered variants of the row kernel's fix-up of a slotted GEMM (``tg.grouped_rows_mm``
    with gather_R=rows_O, top_k 1 and out=), as ``slotted_bmm_forward`` launches them."""
    return tg.rows_variants(a.device.index, w_E, transpose_w, gather=True, scatter=tg.SCATTER_GATHERED, bias=False,
                            epilogue=tg.EPILOGUE_RELU if relu else tg.EPILOGUE_NONE)


class _SlottedBmm(torch.autograd.Function):
    """Each direction one native call (``slotted_bmm_forward`` / ``_backward``) once the Triton
    kernels it launches have registered variants that fit; else the same steps from Python, whose
    launches register them."""

    @staticmethod
    def forward(ctx, a_SK, w_E, transpose_w, rows_O, over_E, hosted_E, relu):
        a_SK = a_SK.contiguous()
        ctx.save_for_backward(a_SK, w_E, rows_O, over_E, hosted_E)
        ctx.transpose_w = transpose_w
        native = _native.loaded()
        ids = _fixup_variants(a_SK, w_E, transpose_w, relu) if _native_gemms else None
        if ids:
            out = native.slotted_bmm_forward(a_SK, w_E, transpose_w, relu, rows_O, over_E, ids)
            if out:
                return out[0]
        if relu:
            h_ECN = _fused_gemm.fc1_relu(a_SK.view(w_E.shape[0], -1, a_SK.shape[1]), w_E, None)
            c_SN = h_ECN.view(a_SK.shape[0], -1)
        else:
            c_SN = _bmm(a_SK, w_E, transpose_w)
        tg.grouped_rows_mm(a_SK, over_E, w_E, transpose_w, gather_R=rows_O, top_k=1, out=c_SN,
                           epilogue=tg.EPILOGUE_RELU if relu else tg.EPILOGUE_NONE)
        return c_SN

    @staticmethod
    def backward(ctx, gc_SN):
        a_SK, w_E, rows_O, over_E, hosted_E = ctx.saved_tensors
        transpose_w, E = ctx.transpose_w, w_E.shape[0]
        gc_SN = gc_SN.contiguous()
        need_a, need_w = ctx.needs_input_grad[:2]
        if _native_gemms:
            grads = _native_backward(gc_SN, a_SK, w_E, transpose_w, rows_O, over_E, hosted_E, need_a, need_w)
            if grads:
                return grads[0] if need_a else None, grads[1] if need_w else None, None, None, None, None, None
        ga_SK = gw_E = None
        if need_a:
            ga_SK = _bmm(gc_SN, w_E, not transpose_w)
            tg.grouped_rows_mm(gc_SN, over_E, w_E, not transpose_w, gather_R=rows_O, top_k=1, out=ga_SK)
        if need_w:
            # [E, N, KD] = gc^T a per expert, or [E, KD, N] = a^T gc
            p_SP, q_SQ = (gc_SN, a_SK) if transpose_w else (a_SK, gc_SN)
            gw_E = torch.bmm(p_SP.view(E, -1, p_SP.shape[1]).transpose(1, 2), q_SQ.view(E, -1, q_SQ.shape[1]))
            # the bmm summed each overflow row into its slot owner's gradient: move it to its own
            # expert's (an expert with overflow has no free slots, so none both loses and gains)
            tg.ragged_k_move(gw_E, p_SP, q_SQ, rows_O, hosted_E, over_E)
        return ga_SK, gw_E, None, None, None, None, None


def _native_backward(gc_SN: Tensor, a_SK: Tensor, w_E: Tensor, transpose_w: bool, rows_O: Tensor, over_E: Tensor,
                     hosted_E: Tensor, need_a: bool, need_w: bool) -> list[Tensor] | None:
    """``slotted_bmm_backward``'s (ga, gw), or None when a kernel it needs has no registered variant."""
    dgrad_ids = _fixup_variants(gc_SN, w_E, not transpose_w, False) if need_a else []
    move_ids = tg.ragged_k_move_variants(gc_SN.device.index, *w_E.shape) if need_w else []
    if (need_a and not dgrad_ids) or (need_w and not move_ids):
        return None
    return _native.loaded().slotted_bmm_backward(gc_SN, a_SK, w_E, transpose_w, rows_O, over_E, hosted_E, need_a,
                                                 need_w, dgrad_ids, move_ids) or None


_native_gemms = True


def set_native_gemms(enabled: bool) -> None:
    """Whether slotted GEMMs run as one native call per direction once their Triton kernels are
    registered (True, the default) or always as Python steps, e.g. for A/B runs."""
    global _native_gemms
    _native_gemms = bool(enabled)


_enabled = True
# The fix-ups cost per expert they touch, not per overflow row: each such expert gets at least
# one row tile per GEMM and a read-modify-write of its weight gradients (as much memory traffic
# as its share of a weight-gradient GEMM at DeepSeek-V3's sizes). H100, bf16, one training step
# (h100_ab_dropless_train_slots_*.log): balanced routing (no expert touched) DeepSeek-V3 42.7 ms
# vs 46.4 on grouped_mm; random routing (1-2% of rows overflow, most experts touched) 66.2 vs
# 47.4. So the next call takes the slot path only when the last one touched at most 1/16 of the
# experts.
MAX_TOUCHED_FRACTION = 1 / 16
# Calls kept off the slot path lay out their routing (measure) once every this many calls.
REMEASURE_EVERY = 8
# Rows x D x H of one expert GEMM below which grouped_mm serves anyway: the slot path's host time
# (layout, fix-up launches, autograd nodes) must hide behind its GPU gain. When every piece ran
# from Python it added ~1.7 ms of host time per step (h100_slots_07c9aa8_ab_profile.log) and the
# bound was 4e11 (fine-grained 1.4e11: 5.13 ms vs 4.30 on grouped_mm); with the layout, the
# monitor's count and each GEMM's fix-ups native, fine-grained balanced steps read slots 3.68 ms,
# grouped_mm 3.90, cf=1 3.55 (H100, docs/results/2026-11-23/h100_train_host_split_session12_d.log).
# Smaller layers are unmeasured: the bound sits a little below the smallest measured win.
MIN_GEMM_WORK = 1e11


def set_enabled(enabled: bool) -> None:
    """Dropless training calls may use the slot path (True, the default) or always grouped_mm."""
    global _enabled
    _enabled = bool(enabled)


def is_enabled() -> bool:
    return _enabled


def worth_it(rows: int, model_dim: int, hidden: int) -> bool:
    """Whether a call this large gains more GPU time on the slot path than it spends on the host."""
    return rows * model_dim * hidden >= MIN_GEMM_WORK


def touched_experts(counts_E: Tensor, capacity: int) -> Tensor:
    """How many experts a slot layout of these counts would fix up: those with more rows than
    slots, and those whose free slots receive some of that overflow (0-dim int64, on the GPU)."""
    over_E = (counts_E - capacity).clamp(min=0)
    free_E = (capacity - counts_E).clamp(min=0)
    hosting_E = (free_E > 0) & (torch.cumsum(free_E, 0) - free_E < over_E.sum())
    return (over_E > 0).sum() + hosting_E.sum()


class OverflowMonitor:
    """How many experts a layer's last dropless call would have fixed up in slots (the no-grad
    forward's monitor: how many fix-up rows per 1024 routed rows), seen by the host
    without a sync, a copy or an event: the layout kernel writes the count into pinned, mapped host
    memory when it runs (``overflow_layout``'s touched_host), and a decision reads the newest count
    written (usually the previous call's). Why: the copy and event behind each call cost ~60 us of
    a fine-grained training step's forward host time on the H100 machine, time its GPU waited for
    (``scripts/train_host_split.py``, ``docs/results/2026-11-23/h100_train_host_split_session12_c.log``).
    Where the extension cannot write host memory, the monitor has no count and slots stay on."""

    def __init__(self) -> None:
        self.touched_fraction: float | None = None
        self._host: Tensor | None = None   # one pinned int64, -1 until a layout wrote it
        self._count = None                 # numpy view of it: a read costs ~0.1 us (.item() ~1-2)
        self._unwritable = False
        self._off_calls = 0                # calls sent to grouped_mm since the last measured one

    def __reduce__(self):   # copies and pickles of a layer start afresh (pinned memory is per process)
        return (OverflowMonitor, ())

    def prefer_slots(self, whole: int, max_fraction: float | None = None) -> bool:
        """Whether the next call should take the slot path: the newest count is at most
        ``max_fraction`` (default MAX_TOUCHED_FRACTION) of ``whole`` (training: the experts).
        Also while a CUDA graph is captured: the captured call keeps the path decided then."""
        if self._count is not None and self._count[0] >= 0:
            self.touched_fraction = int(self._count[0]) / whole
        limit = MAX_TOUCHED_FRACTION if max_fraction is None else max_fraction
        return self.touched_fraction is None or self.touched_fraction <= limit

    def measure_off_slots(self) -> bool:
        """Whether a call the monitor keeps off the slot path should still lay out its routing
        (to see when slots pay again): every REMEASURE_EVERY-th such call. Why not every call: the
        layout's launch and host time then cost a step on grouped_mm ~2.6% (fine-grained, random
        routing, H100, ``h100_ab_dropless_train_random_session12.log``)."""
        self._off_calls += 1
        return self._off_calls % REMEASURE_EVERY == 0

    def host_count(self, native) -> Tensor | None:
        """The pinned tensor for this call's layout to write its count into; None while a CUDA
        graph is captured (a replay outliving this monitor would write into freed pinned memory)
        or where the extension cannot write host memory."""
        if self._unwritable or torch.cuda.is_current_stream_capturing():
            return None
        if self._host is None:
            host = torch.full((1,), -1, dtype=torch.int64, pin_memory=True)
            if not native.host_writable(host):
                self._unwritable = True
                return None
            self._host, self._count = host, host.numpy()
        return self._host


__all__ = ["MAX_TOUCHED_FRACTION", "MIN_GEMM_WORK", "OverflowMonitor", "REMEASURE_EVERY", "blocker", "is_enabled",
           "layout_on_gpu", "set_enabled", "set_native_gemms", "slotted_bmm", "touched_experts", "worth_it"]
