"""Runs the expert part of one call: dispatch -> (all-to-all) -> experts -> (all-to-all) -> combine.

Legend: T tokens, D model dim, K top-k, E experts, C capacity, R rows of the expert-major buffer.
This file holds the single-process path; ``adaptmoe.parallel`` runs the same stages over a
process group according to the call's adaptive_r / overlap degree / all-to-all algorithm.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import dispatch as dispatch_ops
from .routing import Routing


@dataclass(frozen=True)
class CallKnobs:
    """The resolved per-call knobs (explicit argument, else plan, else layer default)."""

    gate_index: int
    top_k: int
    capacity_factor: float
    adaptive_r: int
    overlap_degree: int
    a2a_algo: str
    expert_kernel: str = "auto"    # 'bmm' | 'grouped' | 'decode'; 'auto' follows the capacity mode


def gate_scales(routing: Routing, is_postscore: bool) -> tuple[Tensor | None, Tensor]:
    """(dispatch scale, combine weights): post-score scales at combine, pre-score at dispatch."""
    if is_postscore:
        return None, routing.weights_TK
    return routing.weights_TK, torch.ones_like(routing.weights_TK)


def run_experts_local(x_RD: Tensor, routing: Routing, experts, num_experts: int) -> Tensor:
    """Experts over the expert-major buffer of this process (all experts are local)."""
    if routing.dropless:
        # a token picks an expert at most once: T bounds every expert's row count
        return experts.forward_grouped(x_RD, routing.counts_E, max_rows_per_expert=routing.slots_TK.shape[0])
    capacity = routing.capacity
    y = experts(x_RD.view(num_experts, capacity, x_RD.shape[1]))
    return y.reshape(num_experts * capacity, math.prod(y.shape[2:]))


def every_token_to_every_expert(routing: Routing, experts, num_experts: int, is_postscore: bool) -> bool:
    """k == E, post-scored, nothing dropped, experts that can run densely: the dispatch would copy
    every token to every expert, so ``run_local`` skips it (``experts.forward_dense``)."""
    T, K = routing.indices_TK.shape
    return (is_postscore and K == num_experts and T > 0 and (routing.capacity is None or routing.capacity >= T)
            and hasattr(experts, "forward_dense"))


def run_local(x_TD: Tensor, routing: Routing, experts, *, num_experts: int, is_postscore: bool) -> Tensor:
    scale_TK, combine_TK = gate_scales(routing, is_postscore)
    if every_token_to_every_expert(routing, experts, num_experts, is_postscore):
        # Tutel's README layer (E = k = 2) in training: no dispatch (a copy of every token per expert)
        # and no dispatch backward; the combine reads token-major rows e * T + t of [E, T, O].
        T = x_TD.shape[0]
        token_major_TK = routing.indices_TK * T + torch.arange(T, device=x_TD.device).unsqueeze(1)
        y_ETO = experts.forward_dense(x_TD)
        return dispatch_ops.combine(y_ETO.reshape(num_experts * T, y_ETO.shape[2]), token_major_TK, combine_TK)
    layout = experts.slot_layout(x_TD, routing) if hasattr(experts, "slot_layout") else None
    if layout is not None:   # dropless in cf=1's slots, overflow rows in free ones (experts.slot_layout)
        x_SD = dispatch_ops.dispatch(x_TD, layout.slots_TK, num_experts * layout.capacity, scale_TK)
        return dispatch_ops.combine(experts.forward_slotted(x_SD, layout), layout.slots_TK, combine_TK)
    x_RD = dispatch_ops.dispatch(x_TD, routing.slots_TK, routing.num_rows, scale_TK)
    y_RO = run_experts_local(x_RD, routing, experts, num_experts)
    return dispatch_ops.combine(y_RO, routing.slots_TK, combine_TK)
