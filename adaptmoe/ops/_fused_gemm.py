"""First expert GEMM with the activation fused into cuBLASLt's epilogue (native ``bmm_nt_act``).

Legend: e experts, C rows per expert (capacity), D model dim, H hidden.

``h_eCH = relu(x_eCD @ w_eHD^T + b_eH)`` in one kernel instead of a GEMM and a separate pass over
e*C*H elements. Eager CUDA only: traced calls (torch.compile) keep the unfused expression, which
inductor fuses itself. The backward is the unfused one's: relu's mask from the saved output, then
the two GEMMs, with the weight gradient contiguous in w's own layout (as ``_BmmNT`` does).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native

# (rtol, atol) of the fused GEMM against a float64 reference of the same inputs, per dtype: one
# rounding of the output plus fp32 accumulation over D (the GPU tests read these).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}

# Activation codes of the native op (native/blaslt.h), matched by identity.
_RELU_CODE = 1


def _epilogue_code(act: Callable[[Tensor], Tensor]) -> int | None:
    return _RELU_CODE if act is F.relu or act is torch.relu else None


def fused_fc1_blocker(x_eCD: Tensor, w_eHD: Tensor, b_eH: Tensor | None, act: Callable[[Tensor], Tensor]) -> str | None:
    """Why the fused GEMM cannot serve these inputs, or None when it can."""
    if not x_eCD.is_cuda:
        return "not a CUDA tensor"
    if _epilogue_code(act) is None:
        return "activation is not relu (the only epilogue wired)"
    if torch.compiler.is_compiling():
        return "traced call (inductor fuses the activation itself)"
    if torch.is_autocast_enabled("cuda"):
        return "autocast is on (operand dtypes are decided per op)"
    dtype = x_eCD.dtype
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {dtype} (float32, float16 or bfloat16 only)"
    if w_eHD.dtype != dtype or (b_eH is not None and b_eH.dtype != dtype):
        return "x, w and b do not share one dtype"
    if not (x_eCD.is_contiguous() and w_eHD.is_contiguous() and (b_eH is None or b_eH.is_contiguous())):
        return "non-contiguous operand"
    per_16_bytes = 16 // x_eCD.element_size()
    if x_eCD.shape[2] % per_16_bytes or w_eHD.shape[1] % per_16_bytes:
        return f"D and H must be multiples of {per_16_bytes} (16-byte rows)"
    if _native.for_tensor(x_eCD) is None:
        return f"native extension unavailable: {_native.status()}"
    return None


def _forward(x_eCD: Tensor, w_eHD: Tensor, b_eH: Tensor | None, act: Callable) -> Tensor:
    return _native.loaded().bmm_nt_act(x_eCD, w_eHD, b_eH, _epilogue_code(act),
                                       torch.backends.cuda.matmul.allow_tf32)


class _BmmNTRelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_eCD: Tensor, w_eHD: Tensor, b_eH: Tensor | None) -> Tensor:
        h_eCH = _forward(x_eCD, w_eHD, b_eH, F.relu)
        ctx.save_for_backward(x_eCD, w_eHD, h_eCH)
        ctx.has_bias = b_eH is not None
        return h_eCH

    @staticmethod
    def backward(ctx, g_eCH: Tensor):
        x_eCD, w_eHD, h_eCH = ctx.saved_tensors
        g_eCH = torch.ops.aten.threshold_backward(g_eCH, h_eCH, 0)   # relu's mask from its output
        gx = torch.bmm(g_eCH, w_eHD) if ctx.needs_input_grad[0] else None
        gw = torch.bmm(g_eCH.transpose(1, 2), x_eCD) if ctx.needs_input_grad[1] else None
        gb = g_eCH.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def fused_fc1(x_eCD: Tensor, w_eHD: Tensor, b_eH: Tensor | None, act: Callable[[Tensor], Tensor]) -> Tensor | None:
    """act(x_eCD @ w_eHD^T + b_eH) through the fused native GEMM, or None where it cannot serve
    (see `fused_fc1_blocker`; the caller then runs the unfused expression)."""
    if fused_fc1_blocker(x_eCD, w_eHD, b_eH, act) is not None:
        return None
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_eCD, w_eHD, b_eH))
    if needs_grad:
        return _BmmNTRelu.apply(x_eCD, w_eHD, b_eH)
    return _forward(x_eCD, w_eHD, b_eH, act)
