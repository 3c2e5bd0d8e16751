"""torch.library registration of adaptmoe::gate_logits: a linear gate's logits as the native
forwards compute them.

Legend: T tokens, D model dim, E experts.

Why an op: the native no-grad forwards compute a gate of few experts (E <= the extension's
``max_gate_experts``) with their own kernel (one warp per token, fp32 sums: cheaper than cuBLAS's
split-K GEMM for a [D, E] weight, and fused with the top-k there). The Python path of a no-grad
call takes the logits from the same code, so both paths route on the same bits; calls that
record autograd keep ``F.linear`` (``adaptmoe.gates.LinearGate``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _native
from ._ops import bypasses_dispatcher

# Against the float64 product: one rounding to the logits' dtype (relative) plus the fp32 sums'
# error, bounded by this times sum_d |x_d * w_d| (the GPU tests read these).
GATE_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-6, 1e-5), torch.float16: (1e-3, 1e-5), torch.bfloat16: (8e-3, 1e-5),
}


def gate_logits_reference(x_TD: Tensor, weight_ED: Tensor, fp32: bool) -> Tensor:
    """x @ W^T: float32 operands when ``fp32``, else x in W's dtype."""
    if fp32:
        x_TD, weight_ED = x_TD.float(), weight_ED.float()
    elif x_TD.dtype != weight_ED.dtype:
        x_TD = x_TD.to(weight_ED.dtype)
    return F.linear(x_TD, weight_ED)


def gate_logits_impl(x_TD: Tensor, weight_ED: Tensor, fp32: bool) -> Tensor:
    native = _native.for_tensor(x_TD)
    if native is not None and hasattr(native, "gate_logits") and x_TD.dim() == 2 and weight_ED.is_cuda:
        return native.gate_logits(x_TD, weight_ED, fp32)
    return gate_logits_reference(x_TD, weight_ED, fp32)


gate_logits_op = torch.library.custom_op("adaptmoe::gate_logits", mutates_args=())(gate_logits_impl)


@gate_logits_op.register_fake
def _(x_TD, weight_ED, fp32):
    return x_TD.new_empty(*x_TD.shape[:-1], weight_ED.shape[0], dtype=torch.float32 if fp32 else weight_ED.dtype)


def gate_logits(x_TD: Tensor, weight_ED: Tensor, fp32: bool) -> Tensor:
    """Logits of a linear gate for calls that autograd does not record (no backward is registered:
    ``LinearGate`` takes ``F.linear`` when a gradient is needed)."""
    if bypasses_dispatcher(x_TD, x_TD, weight_ED):
        return gate_logits_impl(x_TD, weight_ED, fp32)
    return gate_logits_op(x_TD, weight_ED, fp32)
