"""Capacity-padded relu FFN whose first GEMM carries the activation in cuBLASLt's epilogue
(native ``bmm_nt_act``).

Legend: e experts, C rows per expert (capacity), D model dim, H hidden, O output dim.

``y_eCO = relu(x_eCD @ w1_eHD^T + b1_eH) @ w2_eHO``: the relu is no longer its own pass over
e*C*H elements (read + write). H100, bf16, no_grad forward of the layer, A/B in one run
(docs/results/2026-11-22/h100_bench_layer_fused_relu_ab.log): fine64 -2.5%, Mixtral -5.6%,
DeepSeek-V3 -3.0% (host-bound layers moved up to 15% between processes, too noisy to count).
Calls that need a gradient (hidden activations of at least MIN_TRAINING_HIDDEN elements) run the
fused first GEMM as two autograd nodes shaped like bmm and relu (``_Fc1WithRelu`` saves x and w1,
``_ReluOf`` the relu output), followed by a plain bmm: saved tensors and gradients are freed at
the same points as in the unfused graph. (One node for the whole FFN, and later one for GEMM +
relu, held saved tensors or the unmasked gradient longer: +0.37 / +0.56 / +2.25 GiB and +0.9 GiB
peak.)
Eager CUDA only: traced calls (torch.compile) keep the unfused expression, which inductor fuses.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..expert_compute import bmm_nt_grads
from . import _native
from ._decode_op import _DTYPE_CODES, ACTIVATION_CODES, activation_code

# (rtol, atol) of the fused GEMM against a float64 reference of the same inputs, per dtype: one
# rounding of the output plus fp32 accumulation over D (the GPU tests read these).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}

_RELU_CODE = ACTIVATION_CODES["relu"]
_enabled = True
# Calls that need a gradient fuse only when the hidden activation has at least this many elements:
# the two autograd nodes cost host time that a small relu pass does not repay. Interleaved
# training-step A/B on the H100 (docs/results/2026-11-22/h100_ab_fused_relu_train.log): DeepSeek-V3
# (2.7e8) -2.8%, Mixtral (2.3e8) -0.8%, fine-grained (6.7e7) +1.4%, README bf16 (3.4e7) +3.6%.
MIN_TRAINING_HIDDEN = 150_000_000


def set_enabled(enabled: bool) -> None:
    """Turns the fused GEMM off (the unfused bmm, relu, bmm run) or back on, for A/B benchmarks."""
    global _enabled
    _enabled = bool(enabled)


def fused_ffn_blocker(x_eCD: Tensor, w1_eHD: Tensor, b1_eH: Tensor | None, w2_eHO: Tensor,
                      act: Callable[[Tensor], Tensor]) -> str | None:
    """Why the fused FFN cannot serve these inputs, or None when it can."""
    if not _enabled:
        return "turned off by set_enabled(False)"
    if not x_eCD.is_cuda:
        return "not a CUDA tensor"
    if activation_code(act) != _RELU_CODE:
        return "activation is not relu (the only epilogue wired)"
    if torch.compiler.is_compiling():
        return "traced call (inductor fuses the activation itself)"
    if torch.is_autocast_enabled("cuda"):
        return "autocast is on (operand dtypes are decided per op)"
    dtype = x_eCD.dtype
    if dtype not in _DTYPE_CODES:
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


class _Fc1WithRelu(torch.autograd.Function):
    """h = relu(x_eCD @ w1_eHD^T + b1_eH) in one kernel; its backward is the first layer's two
    GEMMs and bias sum for a gradient already masked by relu's (``_ReluOf``). Saves x and w1, as
    bmm does; the weight gradient comes out contiguous in w1's [e, H, D] layout (as _BmmNT)."""

    @staticmethod
    def forward(ctx, x_eCD: Tensor, w1_eHD: Tensor, b1_eH: Tensor | None) -> Tensor:
        ctx.save_for_backward(x_eCD, w1_eHD)
        return fc1_relu(x_eCD, w1_eHD, b1_eH)

    @staticmethod
    def backward(ctx, g_eCH: Tensor):
        x_eCD, w1_eHD = ctx.saved_tensors
        gx, gw = bmm_nt_grads(g_eCH, x_eCD, w1_eHD, ctx.needs_input_grad)
        gb = g_eCH.sum(1) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


class _ReluOf(torch.autograd.Function):
    """The identity on an output that is already relu'd, with relu's backward (gradient masked by
    the saved output). A node of its own, like autograd's relu: it frees the hidden activation and
    the unmasked gradient before the first layer's GEMMs run (one node for both held them through
    those GEMMs: +2 hidden-sized buffers at the peak, +0.9 GiB on Mixtral)."""

    @staticmethod
    def forward(ctx, h_eCH: Tensor) -> Tensor:
        out = h_eCH.view_as(h_eCH)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g_eCH: Tensor) -> Tensor:
        (h_eCH,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(g_eCH, h_eCH, 0)


def relu_of(h_eCH: Tensor) -> Tensor:
    """``h`` (already relu'd by a GEMM epilogue) with relu's backward as its own autograd node."""
    return _ReluOf.apply(h_eCH)


def fused_relu_ffn(x_eCD: Tensor, w1_eHD: Tensor, b1_eH: Tensor | None, w2_eHO: Tensor,
                   act: Callable[[Tensor], Tensor]) -> Tensor | None:
    """relu(x w1^T + b1) w2 with the relu fused into the first GEMM, or None where the fused path
    cannot serve (see `fused_ffn_blocker`; the caller then runs the unfused expression)."""
    if fused_ffn_blocker(x_eCD, w1_eHD, b1_eH, w2_eHO, act) is not None:
        return None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_eCD, w1_eHD, b1_eH)):
        if not training_fusion_pays(x_eCD.shape[0] * x_eCD.shape[1] * w1_eHD.shape[1]):
            return None
        h_eCH = relu_of(_Fc1WithRelu.apply(x_eCD, w1_eHD, b1_eH))
    else:
        h_eCH = fc1_relu(x_eCD, w1_eHD, b1_eH)
    return torch.bmm(h_eCH, w2_eHO)


def training_fusion_pays(hidden_elements: int) -> bool:
    """Whether a call that needs a gradient should fuse the relu (see MIN_TRAINING_HIDDEN)."""
    return hidden_elements >= MIN_TRAINING_HIDDEN
