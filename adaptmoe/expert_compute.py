"""Expert math as pure functions over explicit weight tensors.

Legend: e local experts, C rows per expert (capacity), R routed rows (expert-major, grouped),
D model dim, H hidden (possibly a 1/r slice), O output dim. The executor passes stored or
transiently gathered weights; the functions never look at where the weights came from.

Layouts (Tutel-compatible): w1_eHD (nn.Linear layout), w2_eHO (transposed: input H, output O),
gated FFN adds w3_eHD (the "up" projection multiplied with act(x w1)).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class FFNWeights(NamedTuple):
    w1_eHD: Tensor
    w2_eHO: Tensor
    b1_eH: Tensor | None = None
    b2_eO: Tensor | None = None
    w3_eHD: Tensor | None = None    # gated FFN only


def gated_product(g: Tensor, u: Tensor, act: Callable[[Tensor], Tensor]) -> Tensor:
    """act(g) * u; on CUDA without autograd one native pass instead of two (see ops.act_mul)."""
    if g.is_cuda:
        from .ops._decode_op import act_mul   # lazy: ops imports this module's users
        return act_mul(g, u, act)
    return act(g) * u


def ffn_padded(x_eCD: Tensor, w: FFNWeights, act: Callable[[Tensor], Tensor]) -> Tensor:
    """Batched FFN over a capacity-padded buffer [e, C, D] -> [e, C, O]."""
    y_eCO = _relu_ffn_fused(x_eCD, w, act) if w.w3_eHD is None else None
    if y_eCO is None:
        h_eCH = _bmm_nt(x_eCD, w.w1_eHD)
        if w.b1_eH is not None:
            h_eCH = h_eCH + w.b1_eH.unsqueeze(1)
        if w.w3_eHD is not None:
            h_eCH = gated_product(h_eCH, _bmm_nt(x_eCD, w.w3_eHD), act)
        else:
            h_eCH = act(h_eCH)
        y_eCO = torch.bmm(h_eCH, w.w2_eHO)
    if w.b2_eO is not None:
        y_eCO = y_eCO + w.b2_eO.unsqueeze(1)
    return y_eCO


def ffn_dense(x_TD: Tensor, w: FFNWeights, act: Callable[[Tensor], Tensor]) -> Tensor:
    """Every expert's FFN over every token, [E, T, O] (the layout of calls where every token goes to
    every expert: no dispatch). The first GEMM covers all experts at once (N = E*H: w1 [E, H, D] is
    [E*H, D] as it lies), so its input gradient sums over the experts inside one GEMM; the second
    runs per expert over its column block of h ([E, T, H] with row stride E*H, no copy)."""
    E, H, D = w.w1_eHD.shape
    T = x_TD.shape[0]
    h_TN = F.linear(x_TD, w.w1_eHD.reshape(E * H, D), None if w.b1_eH is None else w.b1_eH.reshape(E * H))
    if w.w3_eHD is not None:
        h_TN = gated_product(h_TN, F.linear(x_TD, w.w3_eHD.reshape(E * H, D)), act)
    else:
        h_TN = act(h_TN)
    y_ETO = torch.bmm(h_TN.view(T, E, H).transpose(0, 1), w.w2_eHO)
    return y_ETO if w.b2_eO is None else y_ETO + w.b2_eO.unsqueeze(1)


def _relu_ffn_fused(x_eCD: Tensor, w: FFNWeights, act: Callable[[Tensor], Tensor]) -> Tensor | None:
    """relu(x w1^T + b1) w2 with the relu in the first GEMM's epilogue on CUDA, else None."""
    if not x_eCD.is_cuda:
        return None
    from .ops._fused_gemm import fused_relu_ffn   # lazy: ops imports this module's users
    return fused_relu_ffn(x_eCD, w.w1_eHD, w.b1_eH, w.w2_eHO, act)


class _BmmNT(torch.autograd.Function):
    """x_eCD @ w_eHD^T whose weight gradient comes out contiguous in w's own [e, H, D] layout
    (plain ``bmm(x, w.transpose(1, 2))`` yields a transposed gradient that AccumulateGrad then
    copies: a full strided pass over the weights every backward)."""

    @staticmethod
    def forward(ctx, x_eCD: Tensor, w_eHD: Tensor) -> Tensor:
        ctx.save_for_backward(x_eCD, w_eHD)
        return torch.bmm(x_eCD, w_eHD.transpose(1, 2))

    @staticmethod
    def backward(ctx, g_eCH: Tensor):
        x_eCD, w_eHD = ctx.saved_tensors
        return bmm_nt_grads(g_eCH, x_eCD, w_eHD, ctx.needs_input_grad)


def bmm_nt_grads(g_eCH: Tensor, x_eCD: Tensor, w_eHD: Tensor, needs_input_grad) -> tuple[Tensor | None, Tensor | None]:
    """(d x, d w) of x_eCD @ w_eHD^T for the upstream g_eCH, each only where needs_input_grad asks;
    d w comes out contiguous in w's [e, H, D] layout."""
    gx = torch.bmm(g_eCH, w_eHD) if needs_input_grad[0] else None
    gw = torch.bmm(g_eCH.transpose(1, 2), x_eCD) if needs_input_grad[1] else None
    return gx, gw


def _bmm_nt(x_eCD: Tensor, w_eHD: Tensor) -> Tensor:
    if (torch.is_autocast_enabled(x_eCD.device.type) or x_eCD.dtype != w_eHD.dtype
            or not torch.is_grad_enabled() or not (x_eCD.requires_grad or w_eHD.requires_grad)):
        return torch.bmm(x_eCD, w_eHD.transpose(1, 2))
    return _BmmNT.apply(x_eCD, w_eHD)


def ffn_grouped(x_RD: Tensor, counts_e: Tensor, w: FFNWeights, act: Callable[[Tensor], Tensor],
                max_rows_per_expert: int | None = None) -> Tensor:
    """FFN over exactly the routed rows: rows of expert i are contiguous, ``counts_e[i]`` of them
    (device tensor; their sum is R). ``max_rows_per_expert``, when the caller knows one (a token
    picks an expert at most once, so T bounds every count), lets the sync-free paths pad less.

    When e * max_rows_per_expert == R every count must equal the bound (top_k == num_experts):
    the grouped rows are then exactly a padded [e, bound] buffer and run as one (faster) batched
    matmul. Else on CUDA, bf16 (or bf16 autocast), sm90+: ``torch._grouped_mm`` with device-side
    int32 cumulative offsets, no host synchronization. Other CUDA dtypes (``_grouped_mm`` is
    bf16-only): a padded batched matmul with min(R, bound) rows per expert (sync-free) when that
    pads at most ``_PADDED_MAX_WASTE``-fold or a CUDA graph is being captured, else one matmul per
    expert (reads counts on the host: eager calls trade one sync for up to e/top_k-fold less
    arithmetic). CPU: one matmul per expert."""
    R = x_RD.shape[0]
    if R == 0:   # a rank or call with no routed rows: nothing to compute (shape is static)
        return x_RD.new_zeros(0, w.w2_eHO.shape[2])
    e = counts_e.numel()
    rows_per_expert = R if max_rows_per_expert is None else min(R, max_rows_per_expert)
    if e * rows_per_expert == R:
        y_eCO = ffn_padded(x_RD.view(e, rows_per_expert, x_RD.shape[1]), w, act)
        return y_eCO.reshape(R, y_eCO.shape[2])
    if x_RD.is_cuda:
        if _grouped_mm_usable(x_RD, w):
            return _ffn_grouped_mm(x_RD, counts_e, w, act)
        # Under CUDA-graph capture a host read of the counts is impossible: pad whatever it costs.
        if e * rows_per_expert <= _PADDED_MAX_WASTE * R or torch.cuda.is_current_stream_capturing():
            return _ffn_grouped_padded(x_RD, counts_e, w, act, rows_per_expert)
    return ffn_grouped_loop(x_RD, counts_e, w, act)


# The padded fallback computes e * rows_per_expert rows for R real ones; past 4x, one matmul per
# expert (a host sync) is cheaper.
_PADDED_MAX_WASTE = 4


def _weight_tensors(w: FFNWeights) -> list[Tensor]:
    return [t for t in w if t is not None]


def _grouped_mm_usable(x_RD: Tensor, w: FFNWeights) -> bool:
    if not hasattr(torch, "_grouped_mm") or torch.cuda.get_device_capability(x_RD.device) < (9, 0):
        return False
    autocast_bf16 = (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    if not autocast_bf16 and not all(t.dtype == torch.bfloat16 for t in (x_RD, *_weight_tensors(w))):
        return False
    # 16-byte aligned row strides for A (R x D), B1 (D x H column-major), h (R x H), B2 (H x O)
    D, H, O = x_RD.shape[1], w.w1_eHD.shape[1], w.w2_eHO.shape[2]
    return D % 8 == 0 and H % 8 == 0 and O % 8 == 0


def _row_experts(offs_e: Tensor, rows: int) -> Tensor:
    """Expert of each grouped row (sync-free), for per-expert biases."""
    r_R = torch.arange(rows, device=offs_e.device, dtype=offs_e.dtype)
    return torch.searchsorted(offs_e, r_R, right=True).clamp_(max=offs_e.numel() - 1)


def _ffn_grouped_mm(x_RD: Tensor, counts_e: Tensor, w: FFNWeights, act: Callable[[Tensor], Tensor]) -> Tensor:
    bf16 = torch.bfloat16
    if x_RD.dtype != bf16 or any(t.dtype != bf16 for t in _weight_tensors(w)):  # bf16 autocast
        x_RD = x_RD.to(bf16)
        w = FFNWeights(*[None if t is None else t.to(bf16) for t in w])
    y_RO = _triton_relu_ffn(x_RD, counts_e, w, act) if torch.is_grad_enabled() else None
    if y_RO is not None:
        return y_RO
    with torch.autocast("cuda", enabled=False):
        offs_e = torch.cumsum(counts_e, 0, dtype=torch.int32)
        rows_e = None
        h_RH = torch._grouped_mm(x_RD, w.w1_eHD.transpose(1, 2), offs=offs_e)
        if w.b1_eH is not None:
            rows_e = _row_experts(offs_e, x_RD.shape[0])
            # fp32 bias rows: their gradient (an index_add over R rows) accumulates in fp32
            h_RH = (h_RH + w.b1_eH.float().index_select(0, rows_e)).to(bf16)
        if w.w3_eHD is not None:
            h_RH = gated_product(h_RH, torch._grouped_mm(x_RD, w.w3_eHD.transpose(1, 2), offs=offs_e), act)
        elif not h_RH.requires_grad and _is_relu(act):
            h_RH = h_RH.relu_()   # no autograd: in place, no second R x H buffer (grouped_mm has no epilogue)
        else:
            h_RH = act(h_RH)
        y_RO = torch._grouped_mm(h_RH, w.w2_eHO, offs=offs_e)
        if w.b2_eO is not None:
            rows_e = _row_experts(offs_e, x_RD.shape[0]) if rows_e is None else rows_e
            y_RO = (y_RO + w.b2_eO.float().index_select(0, rows_e)).to(bf16)
    return y_RO


def _triton_relu_ffn(x_RD: Tensor, counts_e: Tensor, w: FFNWeights, act: Callable[[Tensor], Tensor]) -> Tensor | None:
    """Training calls of 2-matrix relu experts through the Triton grouped FFN (relu and its
    backward in GEMM epilogues: ``ops._triton_ffn``, opt-in, measured slower end to end so far);
    None where it is off or cannot serve."""
    from .ops import _triton_ffn   # lazy: ops imports this module's users
    biases = (w.b1_eH, w.b2_eO)
    if _triton_ffn.blocker(x_RD, w.w1_eHD, w.w2_eHO, biases, _is_relu(act), w.w3_eHD is not None) is not None:
        return None
    with torch.autocast("cuda", enabled=False):
        return _triton_ffn.relu_ffn(x_RD, counts_e, w.w1_eHD, w.b1_eH, w.w2_eHO, w.b2_eO)


def _is_relu(act: Callable[[Tensor], Tensor]) -> bool:
    from .ops._decode_op import ACTIVATION_CODES, activation_code   # lazy: ops imports this module's users
    return activation_code(act) == ACTIVATION_CODES["relu"]


def _ffn_grouped_padded(x_RD: Tensor, counts_e: Tensor, w: FFNWeights, act: Callable[[Tensor], Tensor],
                        rows_per_expert: int) -> Tensor:
    """Sync-free: every expert gets ``rows_per_expert`` padded rows (a bound on every count)."""
    e = counts_e.numel()
    R, D = x_RD.shape
    offs_e = torch.cumsum(counts_e, 0)
    rows_e = _row_experts(offs_e, R)
    start_e = offs_e - counts_e
    r_R = torch.arange(R, device=x_RD.device)
    padded_R = rows_e * rows_per_expert + (r_R - start_e.index_select(0, rows_e))
    x_eCD = x_RD.new_zeros(e * rows_per_expert, D).index_copy(0, padded_R, x_RD).view(e, rows_per_expert, D)
    y_eCO = ffn_padded(x_eCD, w, act)
    return y_eCO.reshape(e * rows_per_expert, -1).index_select(0, padded_R)


def ffn_one_expert(x_nD: Tensor, w: FFNWeights, e: int, act: Callable[[Tensor], Tensor]) -> Tensor:
    """Expert ``e`` of the batched weights on rows ``x_nD`` -> ``y_nO``."""
    h_nH = x_nD @ w.w1_eHD[e].t()
    if w.b1_eH is not None:
        h_nH = h_nH + w.b1_eH[e]
    h_nH = act(h_nH)
    if w.w3_eHD is not None:
        h_nH = h_nH * (x_nD @ w.w3_eHD[e].t())
    y_nO = h_nH @ w.w2_eHO[e]
    if w.b2_eO is not None:
        y_nO = y_nO + w.b2_eO[e]
    return y_nO


def ffn_grouped_loop(x_RD: Tensor, counts_e: Tensor, w: FFNWeights, act: Callable[[Tensor], Tensor]) -> Tensor:
    """Reference: one matmul per expert (reads counts on the host)."""
    outputs = []
    start = 0
    for i, n in enumerate(counts_e.tolist()):
        outputs.append(ffn_one_expert(x_RD[start:start + n], w, i, act))
        start += n
    if not outputs:
        return x_RD.new_zeros(0, w.w2_eHO.shape[2])
    return torch.cat(outputs, dim=0)


def ffn_slotted(x_SD: Tensor, layout, w: FFNWeights, act: Callable[[Tensor], Tensor]) -> Tensor:
    """The FFN over a dropless routing laid out in capacity slots (``routing.OverflowSlots``):
    every GEMM a cuBLAS bmm over the slots plus Triton fix-ups of the overflow rows
    (``ops._triton_slotted``; check its blocker first). The activation is elementwise, so it
    needs no fix-up; a large relu layer runs it in the first GEMMs' epilogues, as cf=1 does
    (``ops._fused_gemm``)."""
    from .ops import _fused_gemm   # lazy: ops imports this module's users
    from .ops._triton_slotted import slotted_bmm
    with torch.autocast("cuda", enabled=False):
        E = w.w1_eHD.shape[0]
        if (w.w3_eHD is None and _fused_gemm.training_fusion_pays(x_SD.shape[0] * w.w1_eHD.shape[1])
                and _fused_gemm.fused_ffn_blocker(x_SD.reshape(E, -1, x_SD.shape[1]), w.w1_eHD, w.b1_eH, w.w2_eHO,
                                                  act) is None):
            # relu in both GEMM epilogues of the first layer, relu's backward its own node (as cf=1's)
            return slotted_bmm(_fused_gemm.relu_of(slotted_bmm(x_SD, w.w1_eHD, True, layout, relu=True)),
                               w.w2_eHO, False, layout)
        h_SH = slotted_bmm(x_SD, w.w1_eHD, True, layout)
        if w.w3_eHD is not None:
            h_SH = gated_product(h_SH, slotted_bmm(x_SD, w.w3_eHD, True, layout), act)
        else:
            h_SH = act(h_SH)
        return slotted_bmm(h_SH, w.w2_eHO, False, layout)
