"""Dropless relu FFN over grouped rows with autograd, on the Triton kernels of ``_triton_gemm``.

Legend: R grouped rows (expert e owns counts_E[e] consecutive rows), D model dim, H hidden,
O output dim, E experts.

Forward: h = relu(x w1^T + b1) with bias and relu in the first GEMM's epilogue, y = h w2 + b2.
Backward: gh = (gy w2^T) masked by h > 0 in the GEMM's epilogue (no threshold_backward pass),
gx = gh w1, and the weight gradients as ragged-K GEMMs (w1: gh^T x, w2: h^T gy) whose bias
gradients come out of the same pass as column sums. Saves x and h, as autograd over
``torch._grouped_mm`` + relu does. Every GEMM is sync-free, so a step can be captured in a CUDA graph.

Opt-in (``set_enabled(True)``): on an H100 (bf16, balanced routing) a whole forward + backward on
these kernels was not faster than autograd over grouped_mm for any benchmark shape, whichever
GEMMs ran in Triton: per FFN (``h100_explore_triton_train.log``) fine-grained 3.69-3.81 ms vs
3.61, DeepSeek-V3 56.7-61.7 vs 54.6, Mixtral 22.5-23.8 vs 19.5; per layer training step after
the row kernel went persistent (``h100_slots_07c9aa8_ab_balanced.log``) fine-grained 4.27 vs
4.12, DeepSeek-V3 48.1 vs 45.6 (and +2.7 GiB peak, likely because one node keeps x and h to
its end), Mixtral 20.2 vs 19.0. GEMM by GEMM Triton wins fc1 + relu and the ragged weight gradient of experts with
>= 1024 rows and loses the rest. Balanced training calls of large experts now take
``_triton_slotted`` (cuBLAS GEMMs) first; this stays as the grouped-rows alternative, tested
against float64 and capturable.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from . import _triton_gemm as tg

_enabled = False   # opt-in: see the module docstring


def blocker(x_RD: Tensor, w1_EHD: Tensor, w2_EHO: Tensor, biases: tuple[Tensor | None, ...], is_relu: bool,
            gated: bool) -> str | None:
    """Why ``relu_ffn`` cannot serve this call, or None."""
    if not _enabled:
        return "opt-in, off (measured slower than grouped_mm): adaptmoe.ops._triton_ffn.set_enabled(True)"
    if gated or not is_relu:
        return "only the 2-matrix relu FFN is wired (gated or other activations use grouped_mm)"
    if torch.compiler.is_compiling():
        return "under torch.compile the traceable grouped_mm path serves"
    D, H, O = w1_EHD.shape[2], w1_EHD.shape[1], w2_EHO.shape[2]
    return tg.kernel_blocker(x_RD, (w1_EHD, w2_EHO, *biases), reduced=(D, H, O), produced=(D, H, O))


Kernel = Literal["triton", "grouped_mm"]


class FFNKernels(NamedTuple):
    """Which kernel runs each GEMM that has no epilogue (the relu GEMM and its backward, which
    carry epilogues, always run in Triton)."""
    plain: Kernel = "triton"           # h w2 and gh w1
    weight_grads: Kernel = "triton"    # gh^T x and h^T gy (Triton when there are biases: column sums)


def kernels_for(rows: int, experts: int, has_bias: bool) -> FFNKernels:
    """The faster kernel per GEMM for a call with these sizes (``scripts/explore_triton_train.py``
    on an H100; only host-known sizes: the counts stay on the GPU). Triton's ragged weight
    gradient loses to grouped_mm when experts average few rows: each tile then reduces over a
    short K and its prologue and epilogue (not overlapped: no persistent kernel) dominate."""
    few_rows = rows < _RAGGED_MIN_ROWS_PER_EXPERT * experts
    return FFNKernels(plain="triton", weight_grads="grouped_mm" if few_rows and not has_bias else "triton")


# Average rows per expert below which grouped_mm's weight gradient wins (DeepSeek-V3's 512 rows:
# grouped_mm 7.2 / 7.3 ms vs Triton 8.4 / 8.7; fine-grained's 1024: Triton 0.46 / 0.51 vs 0.50 / 0.50).
_RAGGED_MIN_ROWS_PER_EXPERT = 1024


def relu_ffn(x_RD: Tensor, counts_E: Tensor, w1_EHD: Tensor, b1_EH: Tensor | None, w2_EHO: Tensor,
             b2_EO: Tensor | None, kernels: FFNKernels | None = None) -> Tensor:
    """y_RO of the expert FFN over grouped rows; differentiable in x and every weight.
    ``kernels`` defaults to ``kernels_for`` this call's sizes."""
    if kernels is None:
        kernels = kernels_for(x_RD.shape[0], counts_E.numel(), b1_EH is not None or b2_EO is not None)
    return _GroupedReluFFN.apply(x_RD, counts_E, w1_EHD, b1_EH, w2_EHO, b2_EO, kernels)


class _GroupedReluFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, counts_E, w1_EHD, b1_EH, w2_EHO, b2_EO, kernels):
        x_RD = x_RD.contiguous()
        h_RH = tg.grouped_rows_mm(x_RD, counts_E, w1_EHD, True, bias_EN=b1_EH, epilogue=tg.EPILOGUE_RELU)
        if kernels.plain == "triton" or b2_EO is not None:
            y_RO = tg.grouped_rows_mm(h_RH, counts_E, w2_EHO, False, bias_EN=b2_EO)
        else:
            y_RO = torch._grouped_mm(h_RH, w2_EHO, offs=_offsets(counts_E))
        ctx.save_for_backward(x_RD, counts_E, w1_EHD, w2_EHO, h_RH)
        ctx.has_b1, ctx.has_b2, ctx.kernels = b1_EH is not None, b2_EO is not None, kernels
        return y_RO

    @staticmethod
    def backward(ctx, gy_RO):
        x_RD, counts_E, w1_EHD, w2_EHO, h_RH = ctx.saved_tensors
        gy_RO = gy_RO.contiguous()
        kernels, offs_E = ctx.kernels, None
        if kernels.plain != "triton" or kernels.weight_grads != "triton":
            offs_E = _offsets(counts_E)
        gh_RH = tg.grouped_rows_mm(gy_RO, counts_E, w2_EHO, True, epilogue=tg.EPILOGUE_RELU_GRAD, relu_out=h_RH)
        gx_RD = None
        if ctx.needs_input_grad[0]:
            gx_RD = (tg.grouped_rows_mm(gh_RH, counts_E, w1_EHD, False) if kernels.plain == "triton"
                     else torch._grouped_mm(gh_RH, w1_EHD, offs=offs_E))
        if kernels.weight_grads == "triton" or ctx.has_b1 or ctx.has_b2:
            gw2, _, gb2 = tg.ragged_k_mm(h_RH, gy_RO, counts_E, sum_b=ctx.has_b2)
            gw1, gb1, _ = tg.ragged_k_mm(gh_RH, x_RD, counts_E, sum_a=ctx.has_b1)
        else:
            gw2, gb2 = torch._grouped_mm(h_RH.t(), gy_RO, offs=offs_E), None
            gw1, gb1 = torch._grouped_mm(gh_RH.t(), x_RD, offs=offs_E), None
        gb1 = None if gb1 is None else gb1.to(w1_EHD.dtype)
        gb2 = None if gb2 is None else gb2.to(w2_EHO.dtype)
        return gx_RD, None, gw1, gb1, gw2, gb2, None


def _offsets(counts_E: Tensor) -> Tensor:
    return torch.cumsum(counts_E, 0, dtype=torch.int32)


def set_enabled(enabled: bool) -> None:
    """Dropless relu training FFNs on sm90 run these kernels (True) or torch._grouped_mm (False,
    the default: see the module docstring)."""
    global _enabled
    _enabled = bool(enabled)


__all__ = ["FFNKernels", "blocker", "kernels_for", "relu_ffn", "set_enabled"]
