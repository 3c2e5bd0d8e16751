"""Capacity-padded relu FFN whose first GEMM carries the activation in cuBLASLt's epilogue
(native ``bmm_nt_act``).

Legend: e experts, C rows per expert (capacity), D model dim, H hidden, O output dim.

``y_eCO = relu(x_eCD @ w1_eHD^T + b1_eH) @ w2_eHO``: the relu is no longer its own pass over
e*C*H elements (read + write). Eager CUDA only: traced calls (torch.compile) keep the unfused
expression, which inductor fuses itself. Training runs one autograd node for the whole FFN, so its
backward masks the hidden gradient in place (no second e*C*H buffer) and gives both weight
gradients contiguous in the weights' own layouts (as ``expert_compute._BmmNT`` does).
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

_RELU_CODE = 1          # Activation code of native/moe_kernels.h
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Turns the fused GEMM off (the unfused bmm, relu, bmm run) or back on, for A/B benchmarks."""
    global _enabled
    _enabled = bool(enabled)


def _is_relu(act: Callable[[Tensor], Tensor]) -> bool:
    return act is F.relu or act is torch.relu


def fused_ffn_blocker(x_eCD: Tensor, w1_eHD: Tensor, b1_eH: Tensor | None, w2_eHO: Tensor,
                      act: Callable[[Tensor], Tensor]) -> str | None:
    """Why the fused FFN cannot serve these inputs, or None when it can."""
    if not _enabled:
        return "turned off by set_enabled(False)"
    if not x_eCD.is_cuda:
        return "not a CUDA tensor"
    if not _is_relu(act):
        return "activation is not relu (the only epilogue wired)"
    if torch.compiler.is_compiling():
        return "traced call (inductor fuses the activation itself)"
    if torch.is_autocast_enabled("cuda"):
        return "autocast is on (operand dtypes are decided per op)"
    dtype = x_eCD.dtype
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"dtype {dtype} (float32, float16 or bfloat16 only)"
    if any(t is not None and t.dtype != dtype for t in (w1_eHD, b1_eH, w2_eHO)):
        return "x, w1, b1 and w2 do not share one dtype"
    if not all(t is None or t.is_contiguous() for t in (x_eCD, w1_eHD, b1_eH)):
        return "non-contiguous operand"
    per_16_bytes = 16 // x_eCD.element_size()
    if x_eCD.shape[2] % per_16_bytes or w1_eHD.shape[1] % per_16_bytes:
        return f"D and H must be multiples of {per_16_bytes} (16-byte rows)"
    if _native.for_tensor(x_eCD) is None:
        return f"native extension unavailable: {_native.status()}"
    return None


def fc1_relu(x_eCD: Tensor, w1_eHD: Tensor, b1_eH: Tensor | None) -> Tensor:
    """relu(x_eCD @ w1_eHD^T + b1_eH) in one kernel (no autograd; check the blocker first)."""
    return _native.loaded().bmm_nt_act(x_eCD, w1_eHD, b1_eH, _RELU_CODE, torch.backends.cuda.matmul.allow_tf32)


class _FusedReluFFN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_eCD: Tensor, w1_eHD: Tensor, b1_eH: Tensor | None, w2_eHO: Tensor) -> Tensor:
        h_eCH = fc1_relu(x_eCD, w1_eHD, b1_eH)
        ctx.save_for_backward(x_eCD, w1_eHD, h_eCH, w2_eHO)
        ctx.has_bias = b1_eH is not None
        return torch.bmm(h_eCH, w2_eHO)

    @staticmethod
    def backward(ctx, g_eCO: Tensor):
        x_eCD, w1_eHD, h_eCH, w2_eHO = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2 = ctx.needs_input_grad
        gw2 = torch.bmm(h_eCH.transpose(1, 2), g_eCO) if need_w2 else None
        gx = gw1 = gb1 = None
        if need_x or need_w1 or need_b1:
            gh_eCH = torch.bmm(g_eCO, w2_eHO.transpose(1, 2))
            # relu's mask from its output, in place on our own buffer
            torch.ops.aten.threshold_backward.grad_input(gh_eCH, h_eCH, 0, grad_input=gh_eCH)
            gx = torch.bmm(gh_eCH, w1_eHD) if need_x else None
            gw1 = torch.bmm(gh_eCH.transpose(1, 2), x_eCD) if need_w1 else None
            gb1 = gh_eCH.sum(1) if ctx.has_bias and need_b1 else None
        return gx, gw1, gb1, gw2


def fused_relu_ffn(x_eCD: Tensor, w1_eHD: Tensor, b1_eH: Tensor | None, w2_eHO: Tensor,
                   act: Callable[[Tensor], Tensor]) -> Tensor | None:
    """relu(x w1^T + b1) w2 with the relu fused into the first GEMM, or None where the fused path
    cannot serve (see `fused_ffn_blocker`; the caller then runs the unfused expression)."""
    if fused_ffn_blocker(x_eCD, w1_eHD, b1_eH, w2_eHO, act) is not None:
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_eCD, w1_eHD, b1_eH, w2_eHO)):
        return _FusedReluFFN.apply(x_eCD, w1_eHD, b1_eH, w2_eHO)
    return torch.bmm(fc1_relu(x_eCD, w1_eHD, b1_eH), w2_eHO)
