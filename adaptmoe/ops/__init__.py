"""Native ops of adaptmoe behind torch.library: dispatch, combine, fused routing, decode FFN.

Legend: T tokens, E experts, K top-k, D model dim, R rows of the expert-major buffer.

On CUDA the ops run native kernels (the prebuilt ``adaptmoe._C`` or a just-in-time build of
``native/``); elsewhere, or when no extension can be had, the PyTorch reference with the same
signatures (one warning when a CUDA tensor takes that path). Every op has a fake implementation
and a backward, so ``torch.compile(fullgraph=True)`` and CUDA-graph capture work.
"""
from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from . import _native
from ._decode_op import DECODE_TOLERANCES, decode_ffn, native_decode_blocker
from ._ops import (SCORE_FNS, TOLERANCES, assign_slots_op, combine_op, dispatch_op, route_topk_grad,
                   route_topk_op)

__all__ = ["dispatch", "combine", "route_topk", "assign_slots", "decode_ffn", "native_decode_blocker",
           "DECODE_TOLERANCES", "native_available", "native_status",
           "set_native_enabled", "TOLERANCES", "SCORE_FNS"]


def _direct(t: Tensor, *differentiable: Tensor | None) -> ModuleType | None:
    """The extension, for an eager CUDA call that needs no gradient: such a call skips
    torch.library's dispatch, which cost ~0.15 ms of host time per op on the H100 machine (three
    ops per layer call). Traced calls (torch.compile) and calls that autograd must record keep
    the registered op; the kernels and results are the same either way."""
    if not t.is_cuda or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and any(d is not None and d.requires_grad for d in differentiable):
        return None
    return _native.loaded() or _native.load()


def dispatch(x_TD: Tensor, slots_TK: Tensor, num_rows: int, scale_TK: Tensor | None = None) -> Tensor:
    """x_RD: row ``slots_TK[t, k]`` holds ``x_TD[t]`` (times ``scale_TK[t, k]``); other rows 0."""
    native = _direct(x_TD, x_TD, scale_TK)
    if native is not None:
        return native.scatter_rows(x_TD, slots_TK, num_rows, scale_TK, None)[0]
    return dispatch_op(x_TD, slots_TK, num_rows, scale_TK)


def combine(y_RD: Tensor, slots_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """y_TD[t] = sum_k weights_TK[t, k] * y_RD[slots_TK[t, k]] (dropped choices add nothing)."""
    native = _direct(y_RD, y_RD, weights_TK)
    if native is not None:
        return native.gather_rows(y_RD, slots_TK, weights_TK, None)[0]
    return combine_op(y_RD, slots_TK, weights_TK)


def route_topk(logits_TE: Tensor, k: int, score_fn: str = "softmax", normalize: bool = True,
               capacity: int | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Fused scores + top-k + slot assignment: (indices_TK, weights_TK, scores_TE, locations_TK,
    counts_E, slots_TK). ``capacity=None`` is dropless (slots are expert-major rows, T*K of
    them); else slot = e*capacity + location, -1 when the location is >= capacity."""
    cap = -1 if capacity is None else capacity
    native = _direct(logits_TE, logits_TE)
    T, E = logits_TE.shape
    if (native is not None and score_fn in SCORE_FNS and E <= native.max_topk_experts
            and E <= native.max_locate_experts and logits_TE.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return tuple(native.route_topk(logits_TE, k, SCORE_FNS.index(score_fn), normalize, cap, True))
    return route_topk_op(logits_TE, k, score_fn, normalize, cap)


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
