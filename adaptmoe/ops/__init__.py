"""Native ops of adaptmoe behind torch.library: dispatch, combine, fused routing, gate logits, decode FFN.

Legend: T tokens, E experts, K top-k, D model dim, R rows of the expert-major buffer.

On CUDA the ops run native kernels (the prebuilt ``adaptmoe._C`` or a just-in-time build of
``native/``); elsewhere, or when no extension can be had, the PyTorch reference with the same
signatures (one warning when a CUDA tensor takes that path). Every op has a fake implementation
and a backward, so ``torch.compile(fullgraph=True)`` and CUDA-graph capture work.
"""
from __future__ import annotations

from torch import Tensor

from . import _native
from ._decode_op import DECODE_TOLERANCES, decode_ffn, native_decode_blocker
from ._gate_op import gate_logits, gate_logits_reference
from ._ops import (SCORE_FNS, TOLERANCES, CombineFunction, DispatchFunction, RouteTopkFunction, assign_slots_op,
                   bypasses_dispatcher, combine_impl, combine_op, dispatch_impl, dispatch_op, eager_autograd,
                   gshard_loss_native, route_topk_grad, route_topk_impl, route_topk_op)

__all__ = ["dispatch", "combine", "route_topk", "assign_slots", "gate_logits", "decode_ffn", "native_decode_blocker",
           "DECODE_TOLERANCES", "native_available", "native_status",
           "set_native_enabled", "TOLERANCES", "SCORE_FNS"]


def dispatch(x_TD: Tensor, slots_TK: Tensor, num_rows: int, scale_TK: Tensor | None = None) -> Tensor:
    """x_RD: row ``slots_TK[t, k]`` holds ``x_TD[t]`` (times ``scale_TK[t, k]``); other rows 0."""
    if bypasses_dispatcher(x_TD, x_TD, scale_TK):
        return dispatch_impl(x_TD, slots_TK, num_rows, scale_TK)
    op = DispatchFunction.apply if eager_autograd(x_TD) else dispatch_op
    return op(x_TD, slots_TK, num_rows, scale_TK)


def combine(y_RD: Tensor, slots_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * y_RD[slots_TK[t, k]] (dropped choices add nothing)."""
    if bypasses_dispatcher(y_RD, y_RD, weights_TK):
        return combine_impl(y_RD, slots_TK, weights_TK)
    op = CombineFunction.apply if eager_autograd(y_RD) else combine_op
    return op(y_RD, slots_TK, weights_TK)


def route_topk(logits_TE: Tensor, k: int, score_fn: str = "softmax", normalize: bool = True,
               capacity: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused scores + top-k + slot assignment: (indices_TK, weights_TK, scores_TE, locations_TK,
    counts_E, slots_TK). ``capacity=None`` is dropless (slots are expert-major rows, T*K of
    them); else slot = e*capacity + location, -1 when the location is >= capacity."""
    if bypasses_dispatcher(logits_TE, logits_TE):
        op = route_topk_impl
    else:
        op = RouteTopkFunction.apply if eager_autograd(logits_TE) else route_topk_op
    return op(logits_TE, k, score_fn, normalize, -1 if capacity is None else capacity)


def assign_slots(indices_TK: Tensor, num_experts: int, capacity: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(locations_TK, counts_E, slots_TK) in GShard priority order, equal to
    ``adaptmoe.routing.assign_locations`` (token-order priority) and its slot rule."""
    return assign_slots_op(indices_TK, num_experts, -1 if capacity is None else capacity)


def native_available() -> bool:
    """True when the native CUDA kernels are loaded (this may build them just in time)."""
    return _native.load() is not None


def set_native_enabled(enabled: bool) -> None:
    """Run the native kernels (default) or force the PyTorch reference, e.g. to compare the two."""
    _native.set_enabled(enabled)


def native_status() -> str:
    """How the native kernels were loaded, or why they are not."""
    _native.load()
    return _native.status()
