"""Top-k selection, capacity and slot assignment: turns gate scores into one ``Routing`` record.

Legend: T tokens, E experts, K top-k, C capacity (slots per expert), R rows of the expert-major
buffer. Dropless and capacity modes differ only here: every later stage reads ``slots_TK``.

Priority (who keeps a slot when an expert overflows) follows GShard/Tutel: all first choices
before any second choice, and within one choice rank, token order, or descending confidence
with batch-prioritized routing. Slots are assigned by one sort, not by k dense one-hot
cumsums, so BPR and dropless share the same (correct) per-expert counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class Routing:
    indices_TK: Tensor     # int64 expert of each choice
    weights_TK: Tensor     # combine weights (differentiable w.r.t. the gate)
    locations_TK: Tensor   # int64 rank of the choice among its expert's assignments (priority order)
    counts_E: Tensor       # int64 assignments per expert before capacity
    capacity: int | None   # slots per expert, None when dropless
    slots_TK: Tensor       # int64 row in the expert-major buffer, -1 when dropped
    num_rows: int          # E*C, or T*K when dropless

    @property
    def dropless(self) -> bool:
        return self.capacity is None

    def kept_counts_E(self) -> Tensor:
        """Rows each expert actually processes (counts clipped by capacity)."""
        if self.capacity is None:
            return self.counts_E
        return self.counts_E.clamp(max=self.capacity)


def capacity_for(capacity_factor: float, tokens: int, num_experts: int, top_k: int) -> int | None:
    """Tutel's capacity: cf>0 -> k*floor(cf*ceil(T/E)); cf=0 -> dropless (None); cf<0 -> the cap
    k*floor(-cf*ceil(T/E)). For cf<0 Tutel uses min(need, cap); dropping the choices at
    location >= cap keeps exactly the same tokens, without a host sync to learn ``need``."""
    if capacity_factor == 0:
        return None
    per_expert = math.ceil(tokens / num_experts) if tokens else 0
    return top_k * math.floor(abs(capacity_factor) * per_expert)


def assign_locations(indices_TK: Tensor, num_experts: int, priority_T: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (locations_TK, counts_E, sorted_position_TK): the position of each choice in the
    expert-major order and its rank inside its expert."""
    T, K = indices_TK.shape
    device = indices_TK.device
    n = T * K
    rank_T = torch.arange(T, device=device) if priority_T is None else priority_T
    # Choice k of every token outranks choice k+1 of any token; inside a choice rank, rank_T decides.
    order_TK = torch.arange(K, device=device).unsqueeze(0) * T + rank_T.unsqueeze(1)
    key_N = indices_TK.reshape(-1) * max(n, 1) + order_TK.reshape(-1)
    sort_N = torch.argsort(key_N)
    position_N = torch.empty_like(sort_N)
    position_N[sort_N] = torch.arange(n, device=device)
    counts_E = torch.bincount(indices_TK.reshape(-1), minlength=num_experts)
    offsets_E = torch.cumsum(counts_E, 0) - counts_E
    locations_N = position_N - offsets_E[indices_TK.reshape(-1)]
    return locations_N.view(T, K), counts_E, position_N.view(T, K)


def confidence_rank(scores_TE: Tensor) -> Tensor:
    """Batch-prioritized routing: rank 0 goes to the token with the highest top score."""
    order_T = torch.argsort(scores_TE.max(dim=1).values, descending=True, stable=True)
    rank_T = torch.empty_like(order_T)
    rank_T[order_T] = torch.arange(order_T.numel(), device=order_T.device)
    return rank_T


def build_routing(indices_TK: Tensor, weights_TK: Tensor, num_experts: int, capacity_factor: float,
                  priority_T: Tensor | None = None) -> Routing:
    T, K = indices_TK.shape
    capacity = capacity_for(capacity_factor, T, num_experts, K)
    num_rows = T * K if capacity is None else num_experts * capacity
    if priority_T is None:
        # Token-order priority is what the native slot kernel computes (no sort, no host sync).
        from . import ops
        locations_TK, counts_E, slots_TK = ops.assign_slots(indices_TK, num_experts, capacity)
        return Routing(indices_TK, weights_TK, locations_TK, counts_E, capacity, slots_TK, num_rows)
    locations_TK, counts_E, position_TK = assign_locations(indices_TK, num_experts, priority_T)
    if capacity is None:
        return Routing(indices_TK, weights_TK, locations_TK, counts_E, None, position_TK, num_rows)
    kept_TK = locations_TK < capacity
    slots_TK = torch.where(kept_TK, indices_TK * capacity + locations_TK, torch.full_like(indices_TK, -1))
    return Routing(indices_TK, weights_TK, locations_TK, counts_E, capacity, slots_TK, num_rows)


def fusable_gate(config, training: bool) -> bool:
    """Whether one fused op (scores + top-k + slots) computes exactly what this gate asks for."""
    if config.batch_prioritized or config.activation_after_topk:
        return False
    if training and (config.expert_dropout > 0 or config.kind == "sinkmoid"):
        return False
    return True


def fused_routing(logits_TE: Tensor, config, top_k: int, capacity_factor: float) -> tuple[Routing, Tensor]:
    """Routing through ``ops.route_topk`` (native kernel on CUDA); returns it and the per-token
    probabilities the balance losses read (see ``gates.select_experts``)."""
    from . import ops
    T, E = logits_TE.shape
    sigmoid = config.kind in ("sigmoid", "sinkmoid")
    capacity = capacity_for(capacity_factor, T, E, top_k)
    indices_TK, weights_TK, scores_TE, locations_TK, counts_E, slots_TK = ops.route_topk(
        logits_TE, top_k, "sigmoid" if sigmoid else "softmax", config.normalize_topk and top_k > 1, capacity)
    probs_TE = scores_TE / scores_TE.sum(dim=1, keepdim=True).clamp(min=1e-9) if sigmoid else scores_TE
    num_rows = T * top_k if capacity is None else E * capacity
    return Routing(indices_TK, weights_TK, locations_TK, counts_E, capacity, slots_TK, num_rows), probs_TE


class OverflowSlots(NamedTuple):
    """A dropless routing laid out in E*C capacity slots: each expert's first C rows in its own
    slots, the rest ("overflow") in slots other experts leave free. Overflow row g (ordered by
    true expert, then rank) sits in slot rows_O[g]; the g-th free slot in slot order, so rows_O
    increases with g and is grouped both by true expert (counts over_E) and by the expert owning
    the slot (counts hosted_E). Only the first sum(over_E) entries of rows_O are meaningful."""
    slots_TK: Tensor    # int64 slot of each choice (none dropped)
    rows_O: Tensor      # int64 [T*K] slots of the overflow rows
    over_E: Tensor      # int64 overflow rows per true expert
    hosted_E: Tensor    # int64 overflow rows placed in each expert's free slots
    capacity: int


def overflow_slots(routing: Routing, capacity: int) -> OverflowSlots:
    """Places a dropless ``routing`` in ``capacity`` slots per expert with no host sync (torch
    ops on the routing's device). Needs E * capacity >= T * K so that every overflow row finds a
    free slot."""
    T, K = routing.indices_TK.shape
    E = routing.counts_E.numel()
    if E * capacity < T * K:
        raise ValueError(f"capacity must hold every row: {E} experts x {capacity} < {T * K} rows")
    e_TK, loc_TK, n_E = routing.indices_TK, routing.locations_TK, routing.counts_E
    over_E = (n_E - capacity).clamp(min=0)
    free_E = (capacity - n_E).clamp(min=0)
    free_end_E = torch.cumsum(free_E, 0)
    over_TK = loc_TK >= capacity
    g_TK = (torch.cumsum(over_E, 0) - over_E)[e_TK] + loc_TK - capacity   # overflow index, where over_TK
    g_TK = torch.where(over_TK, g_TK, torch.zeros_like(g_TK))
    host_TK = torch.searchsorted(free_end_E, g_TK, right=True).clamp(max=E - 1)
    free_slot_TK = host_TK * capacity + n_E[host_TK] + g_TK - (free_end_E - free_E)[host_TK]
    slots_TK = torch.where(over_TK, free_slot_TK, e_TK * capacity + loc_TK)
    rows_O = torch.zeros(T * K + 1, dtype=torch.int64, device=e_TK.device)
    rows_O.scatter_(0, torch.where(over_TK, g_TK, T * K).reshape(-1), slots_TK.reshape(-1))
    total_over = over_E.sum()
    hosted_E = (total_over - (free_end_E - free_E)).clamp(min=0).minimum(free_E)
    return OverflowSlots(slots_TK, rows_O[:T * K], over_E, hosted_E, capacity)
