"""Dispatch (tokens -> expert-major rows) and combine (rows -> tokens, weighted sum over k).

Legend: T tokens, D model dim, K top-k, R rows of the expert-major buffer (E*C in capacity
mode, T*K dropless). ``slots_TK`` holds the row each (token, choice) goes to, or -1 when the
choice was dropped by capacity.

These are the reference implementations (pure PyTorch, any device, any dtype, autograd by
PyTorch itself). ``adaptmoe.ops`` swaps in native CUDA kernels with the same signatures.
"""
from __future__ import annotations

import torch
from torch import Tensor


def dispatch_reference(x_TD: Tensor, slots_TK: Tensor, num_rows: int, scale_TK: Tensor | None = None) -> Tensor:
    """Rows ``slots_TK[t, k]`` of the result hold ``x_TD[t]`` (times ``scale_TK[t, k]``); other rows are 0."""
    T, K = slots_TK.shape
    kept_N = (slots_TK >= 0).reshape(-1)
    src_N = torch.arange(T, device=x_TD.device).repeat_interleave(K)[kept_N]
    rows_N = slots_TK.reshape(-1)[kept_N]
    vals_ND = x_TD.index_select(0, src_N)
    if scale_TK is not None:
        vals_ND = vals_ND * scale_TK.reshape(-1)[kept_N].unsqueeze(1).to(vals_ND.dtype)
    out_RD = x_TD.new_zeros(num_rows, x_TD.shape[1])
    # Each row receives at most one (token, choice), so index_copy is exact (no accumulation).
    return out_RD.index_copy(0, rows_N, vals_ND)


def combine_reference(y_RD: Tensor, slots_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """``y_TD[t] = sum_k weights_TK[t, k] * y_RD[slots_TK[t, k]]``; dropped choices add nothing."""
    kept_TK = slots_TK >= 0
    safe_TK = torch.where(kept_TK, slots_TK, torch.zeros_like(slots_TK))
    picked_TKD = y_RD.index_select(0, safe_TK.reshape(-1)).view(*slots_TK.shape, y_RD.shape[1])
    w_TK = torch.where(kept_TK, weights_TK, torch.zeros_like(weights_TK)).to(y_RD.dtype)
    return torch.einsum("tkd,tk->td", picked_TKD, w_TK)


def dispatch(x_TD: Tensor, slots_TK: Tensor, num_rows: int, scale_TK: Tensor | None = None) -> Tensor:
    """``dispatch_reference`` through the ``adaptmoe::dispatch`` op (native kernels on CUDA)."""
    from . import ops  # lazy: ops imports this module for its references
    return ops.dispatch(x_TD, slots_TK, num_rows, scale_TK)


def combine(y_RD: Tensor, slots_TK: Tensor, weights_TK: Tensor) -> Tensor:
    """``combine_reference`` through the ``adaptmoe::combine`` op (native kernels on CUDA)."""
    from . import ops
    return ops.combine(y_RD, slots_TK, weights_TK)
