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
from . import _fused_gemm
from . import _triton_gemm as tg
from ._triton_native import RegisteredLaunches

try:
    import triton
    import triton.language as tl
except ImportError:   # the blocker keeps this path off
    triton = None


def blocker(x_SD: Tensor, weights: tuple[Tensor, ...], biases: tuple[Tensor | None, ...]) -> str | None:
    """Why ``slotted_bmm`` cannot serve these expert weights (each [E, H, D] or [E, H, O]), or None."""
    if any(b is not None for b in biases):
        return "expert biases are not wired (their rows would need the owner's and the true expert's bias)"
    if torch.compiler.is_compiling():
        return "under torch.compile the traceable grouped_mm path serves"
    dims = {d for w in weights for d in w.shape[1:]}
    return tg.kernel_blocker(x_SD, weights, reduced=tuple(dims), produced=tuple(dims))


if triton is not None:
    @triton.jit
    def _layout_kernel(idx_ptr, loc_ptr, counts_ptr, scratch_ptr, slots_ptr, rows_ptr, over_ptr, hosted_ptr,
                       touched_ptr, N, E, C, EP: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
        # routing.overflow_slots in one launch. Every program derives the same per-expert prefix
        # sums from the counts and stores them to the same scratch (so the values read back are
        # right whichever program's store lands), then places its BLOCK choices.
        experts = tl.arange(0, EP)
        valid = experts < E
        n = tl.load(counts_ptr + experts, mask=valid, other=0)
        over = tl.where(valid, tl.maximum(n - C, 0), 0)
        free = tl.where(valid, tl.maximum(C - n, 0), 0)
        free_end = tl.cumsum(free, 0)
        total_over = tl.sum(over, 0)
        tl.store(scratch_ptr + experts, tl.cumsum(over, 0) - over)
        tl.store(scratch_ptr + EP + experts, free_end)
        tl.debug_barrier()
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < N
        e = tl.load(idx_ptr + offs, mask=inside, other=0)
        loc = tl.load(loc_ptr + offs, mask=inside, other=0)
        overflowing = inside & (loc >= C)
        g = tl.load(scratch_ptr + e, mask=inside, other=0) + loc - C
        lo = tl.zeros((BLOCK,), dtype=tl.int64)   # host = number of experts whose free slots end at or before g
        hi = tl.zeros((BLOCK,), dtype=tl.int64) + E
        for _ in tl.static_range(SEARCH_STEPS):    # binary search over the non-decreasing free_end
            searching = lo < hi
            mid = (lo + hi) // 2
            ends = tl.load(scratch_ptr + EP + mid, mask=inside & searching, other=0)
            lo = tl.where(searching & (ends <= g), mid + 1, lo)
            hi = tl.where(searching & (ends > g), mid, hi)
        host = tl.minimum(lo, E - 1)
        host_free = tl.maximum(C - tl.load(counts_ptr + host, mask=overflowing, other=0), 0)
        host_start = tl.load(scratch_ptr + EP + host, mask=overflowing, other=0) - host_free
        host_n = tl.load(counts_ptr + host, mask=overflowing, other=0)
        slot = tl.where(overflowing, host * C + host_n + g - host_start, e * C + loc)
        tl.store(slots_ptr + offs, slot, mask=inside)
        tl.store(rows_ptr + g, slot, mask=overflowing)
        if tl.program_id(0) == 0:
            hosted = tl.minimum(tl.maximum(total_over - (free_end - free), 0), free)
            tl.store(over_ptr + experts, over, mask=valid)
            tl.store(hosted_ptr + experts, hosted, mask=valid)
            tl.store(touched_ptr, tl.sum((over > 0).to(tl.int64), 0) + tl.sum((hosted > 0).to(tl.int64), 0))


if triton is not None:
    _layout_launches = RegisteredLaunches(_layout_kernel)


def layout_on_gpu(routing: Routing, capacity: int) -> tuple[OverflowSlots, Tensor]:
    """(``routing.overflow_slots(routing, capacity)``, how many experts it touches) in one Triton
    launch instead of ~15 torch ops (~0.3 ms of host time on the H100 machine). Needs
    E * capacity >= T * K (the caller's capacity is cf=1's, which always holds)."""
    T, K = routing.indices_TK.shape
    E, N = routing.counts_E.numel(), T * K
    dev = routing.counts_E.device
    EP = max(16, triton.next_power_of_2(E))
    scratch = torch.empty(2 * EP, dtype=torch.int64, device=dev)
    slots = torch.empty(N, dtype=torch.int64, device=dev)
    rows = torch.empty(N, dtype=torch.int64, device=dev)
    per_expert = torch.empty(2 * E + 1, dtype=torch.int64, device=dev)
    block = 1024
    _layout_launches(
        max(triton.cdiv(N, block), 1), routing.indices_TK.reshape(-1), routing.locations_TK.reshape(-1),
        routing.counts_E, scratch, slots, rows, per_expert, per_expert[E:], per_expert[2 * E:], N, E, capacity,
        EP=EP, SEARCH_STEPS=EP.bit_length(), BLOCK=block, num_warps=4, num_stages=3)
    layout = OverflowSlots(slots.view(T, K), rows, per_expert[:E], per_expert[E:2 * E], capacity)
    return layout, per_expert[2 * E]


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


class _SlottedBmm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_SK, w_E, transpose_w, rows_O, over_E, hosted_E, relu):
        a_SK = a_SK.contiguous()
        if relu:
            h_ECN = _fused_gemm.fc1_relu(a_SK.view(w_E.shape[0], -1, a_SK.shape[1]), w_E, None)
            c_SN = h_ECN.view(a_SK.shape[0], -1)
        else:
            c_SN = _bmm(a_SK, w_E, transpose_w)
        tg.grouped_rows_mm(a_SK, over_E, w_E, transpose_w, gather_R=rows_O, top_k=1, out=c_SN,
                           epilogue=tg.EPILOGUE_RELU if relu else tg.EPILOGUE_NONE)
        ctx.save_for_backward(a_SK, w_E, rows_O, over_E, hosted_E)
        ctx.transpose_w = transpose_w
        return c_SN

    @staticmethod
    def backward(ctx, gc_SN):
        a_SK, w_E, rows_O, over_E, hosted_E = ctx.saved_tensors
        transpose_w, E = ctx.transpose_w, w_E.shape[0]
        gc_SN = gc_SN.contiguous()
        ga_SK = gw_E = None
        if ctx.needs_input_grad[0]:
            ga_SK = _bmm(gc_SN, w_E, not transpose_w)
            tg.grouped_rows_mm(gc_SN, over_E, w_E, not transpose_w, gather_R=rows_O, top_k=1, out=ga_SK)
        if ctx.needs_input_grad[1]:
            # [E, N, KD] = gc^T a per expert, or [E, KD, N] = a^T gc
            p_SP, q_SQ = (gc_SN, a_SK) if transpose_w else (a_SK, gc_SN)
            gw_E = torch.bmm(p_SP.view(E, -1, p_SP.shape[1]).transpose(1, 2), q_SQ.view(E, -1, q_SQ.shape[1]))
            # the bmm summed each overflow row into its slot owner's gradient: move it to its own
            # expert's (an expert with overflow has no free slots, so none both loses and gains)
            tg.ragged_k_move(gw_E, p_SP, q_SQ, rows_O, hosted_E, over_E)
        return ga_SK, gw_E, None, None, None, None, None




_enabled = True
# The fix-ups cost per expert they touch, not per overflow row: each such expert gets at least
# one row tile per GEMM and a read-modify-write of its weight gradients (as much memory traffic
# as its share of a weight-gradient GEMM at DeepSeek-V3's sizes). H100, bf16, one training step
# (h100_ab_dropless_train_slots_*.log): balanced routing (no expert touched) DeepSeek-V3 42.7 ms
# vs 46.4 on grouped_mm; random routing (1-2% of rows overflow, most experts touched) 66.2 vs
# 47.4. So the next call takes the slot path only when the last one touched at most 1/16 of the
# experts.
MAX_TOUCHED_FRACTION = 1 / 16
# Rows x D x H of one expert GEMM below which grouped_mm serves anyway: the slot path adds ~1.7 ms
# of host time per training step on the H100 machine (layout, fix-up launches, autograd nodes:
# h100_slots_07c9aa8_ab_profile.log, _host_cost.log), which a small layer cannot hide behind its
# GPU work. Balanced routing, one step: fine-grained (1.4e11) 5.13 ms vs 4.30 on grouped_mm,
# Mixtral (9.6e11) 18.89 vs 19.40, DeepSeek-V3 (1.9e12) 42.29 vs 47.62.
MIN_GEMM_WORK = 4e11


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
    """How many experts a layer's last dropless call would have fixed up in slots, read back
    without a host sync: the count is copied to pinned memory behind the call's kernels and read
    once that copy is done, so a decision uses the newest finished call (usually the previous)."""

    def __init__(self) -> None:
        self.touched_fraction: float | None = None
        self._host: Tensor | None = None   # pinned, reused: a copy starts only after the last was read
        self._pending: tuple[torch.cuda.Event, int] | None = None

    def __reduce__(self):   # copies and pickles of a layer start afresh (CUDA events do not copy)
        return (OverflowMonitor, ())

    def prefer_slots(self) -> bool:
        """Whether the next call should take the slot path (also while a CUDA graph is captured:
        the captured call keeps the path decided then)."""
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if self._pending is not None and not capturing and self._pending[0].query():
            self.touched_fraction, self._pending = int(self._host.item()) / self._pending[1], None
        return self.touched_fraction is None or self.touched_fraction <= MAX_TOUCHED_FRACTION

    def record(self, touched: Tensor, num_experts: int) -> None:
        """Reads ``touched`` (0-dim int64 on the GPU, this call's count) back when it is ready."""
        if not touched.is_cuda or torch.cuda.is_current_stream_capturing() or self._pending is not None:
            return
        if self._host is None:
            self._host = torch.empty((), dtype=torch.int64, pin_memory=True)
        self._host.copy_(touched, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending = (event, num_experts)


__all__ = ["MAX_TOUCHED_FRACTION", "MIN_GEMM_WORK", "OverflowMonitor", "blocker", "is_enabled", "layout_on_gpu", "set_enabled",
           "slotted_bmm", "touched_experts", "worth_it"]
