"""Capacity-padded relu FFN whose first GEMM carries the activation in cuBLASLt's epilogue
(native ``bmm_nt_act``), for inference.

Legend: e experts, C rows per expert (capacity), D model dim, H hidden, O output dim.

``y_eCO = relu(x_eCD @ w1_eHD^T + b1_eH) @ w2_eHO``: the relu is no longer its own pass over
e*C*H elements (read + write). H100, bf16, no_grad forward of the layer, A/B in one run
(docs/results/2026-11-22/h100_bench_layer_fused_relu_ab.log): fine64 -2.5%, Mixtral -5.6%,
DeepSeek-V3 -3.0% (host-bound layers moved up to 15% between processes, too noisy to count).
Calls that need a gradient keep the unfused path: a single autograd node for the fused FFN (hidden
gradient masked in place) measured peak memory +0.37 / +0.56 / +2.25 GiB on fine64 / Mixtral /
DeepSeek-V3 (its saved tensors live until the whole node's backward ends, where the unfused graph
frees the hidden activation after the second GEMM's backward) and no fwd+bwd gain.
Eager CUDA only: traced calls (torch.compile) keep the unfused expression, which inductor fuses.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import _native
from ._decode_op import _DTYPE_CODES, ACTIVATION_CODES, activation_code

# (rtol, atol) of the fused GEMM against a float64 reference of the same inputs, per dtype: one
# rounding of the output plus fp32 accumulation over D (the GPU tests read these).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-4, 1e-4), torch.float16: (4e-3, 4e-3), torch.bfloat16: (2e-2, 2e-2)}

_RELU_CODE = ACTIVATION_CODES["relu"]
_enabled = True


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
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x_eCD, w1_eHD, b1_eH, w2_eHO)):
        return "a gradient is needed (training keeps bmm, relu, bmm: see the module docstring)"
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


def fused_relu_ffn(x_eCD: Tensor, w1_eHD: Tensor, b1_eH: Tensor | None, w2_eHO: Tensor,
                   act: Callable[[Tensor], Tensor]) -> Tensor | None:
    """relu(x w1^T + b1) w2 with the relu fused into the first GEMM, or None where the fused path
    cannot serve (see `fused_ffn_blocker`; the caller then runs the unfused expression)."""
    if fused_ffn_blocker(x_eCD, w1_eHD, b1_eH, w2_eHO, act) is not None:
        return None
    return torch.bmm(fc1_relu(x_eCD, w1_eHD, b1_eH), w2_eHO)
