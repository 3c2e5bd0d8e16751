"""Per-rank sizes of one layer call under one plan: rows, bytes, flops (no timing here).

Legend: T tokens on this rank, D model dim, H expert hidden, E global experts, K top-k,
C capacity per expert per source rank, W ranks in the group, S shards of one expert (W/E when
E < W), R = adaptive_r. Routing is assumed balanced: every expert receives the same rows, so a
rank receives what it sends. Load imbalance is left to the runtime's measured autotuning.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from planner.plan import LayerSignature, Plan


def shards_per_expert(num_experts: int, world_size: int) -> int:
    """S: ranks sharing one expert (its hidden dim split S ways); 1 when each rank has whole ones."""
    return 1 if num_experts >= world_size else world_size // num_experts


def valid_adaptive_rs(shards: int) -> list[int]:
    """0 (data parallel) and the divisors of S."""
    return [0] + [r for r in range(1, shards + 1) if shards % r == 0]


def capacity_slots(signature: LayerSignature, tokens_per_rank: int) -> int | None:
    """C per expert per source rank; None when dropless (cf == 0: rows are exactly T*K)."""
    cf, k, num_experts = signature.capacity_factor, signature.top_k, signature.num_experts
    if cf == 0:
        return None
    per_expert = math.ceil(tokens_per_rank / num_experts)
    return k * math.floor(abs(cf) * per_expert)   # cf < 0: the cap, which the model charges


def expected_distinct(experts: int, top_k_fraction: float, tokens: float) -> float:
    """Expected experts hit at least once when `tokens` each pick a fraction k/E of them."""
    return experts * (1.0 - (1.0 - top_k_fraction) ** tokens)


@dataclass(frozen=True)
class CallShape:
    shards: int                 # S
    capacity: int | None        # C, None when dropless
    sent_rows: int              # rows this rank's dispatch produces, before replication
    replication: int            # copies of each row in the all-to-all: max(R, 1)
    compute_rows: int           # rows through this rank's expert kernels
    compute_experts: int        # expert instances this rank computes (E for R=0)
    hidden_compute: int         # hidden slice each instance computes
    active_experts: float       # expected instances with at least one row
    a2a_bytes: int              # per-rank all-to-all send buffer (one direction)
    gather_bytes: int           # per-rank gathered weights per gather (0: none)
    gather_group: int           # ranks in the gather group
    stored_weight_bytes: int    # this rank's persistent shard of the expert weights
    flops: float                # forward expert FLOPs on this rank
    weight_read_bytes: float    # weight bytes the expert kernel streams per pass
    rows_per_matrix: float      # GEMM rows each expert matrix sees (efficiency)


def _sent_rows(plan: Plan, signature: LayerSignature, tokens: int, capacity: int | None) -> int:
    routed = tokens * signature.top_k
    if plan.expert_kernel == "bmm":
        return signature.num_experts * (capacity or 0)    # capacity padded, dropped rows too
    return routed if capacity is None else min(routed, signature.num_experts * capacity)


def _gather(plan: Plan, signature: LayerSignature, world_size: int, shards: int
            ) -> tuple[int, int]:
    """(bytes gathered per rank, group size) for the transient weight all-gather R requires."""
    r = plan.adaptive_r
    if r == 0:
        return (signature.num_experts * signature.expert_weight_bytes, world_size) \
            if world_size > 1 else (0, 1)
    if shards > 1 and r < shards:
        return signature.expert_weight_bytes // r, shards // r
    return 0, 1


def call_shape(plan: Plan, signature: LayerSignature, tokens_per_rank: int,
               world_size: int) -> CallShape:
    """Sizes for a plan that passed the divisibility checks (see cost.feasibility)."""
    E, D, H = signature.num_experts, signature.model_dim, signature.hidden
    b, r = signature.dtype_bytes, plan.adaptive_r
    shards = shards_per_expert(E, world_size)
    capacity = capacity_slots(signature, tokens_per_rank)
    sent_rows = _sent_rows(plan, signature, tokens_per_rank, capacity)
    replication = max(r, 1)
    if r == 0:
        compute_experts, hidden, source_tokens = E, H, tokens_per_rank
    elif shards == 1:
        compute_experts, hidden, source_tokens = E // world_size, H, tokens_per_rank * world_size
    else:   # one expert, an H/R slice, R/S of the expert's rows from every rank
        compute_experts, hidden = 1, H // r
        source_tokens = tokens_per_rank * world_size * r / shards
    compute_rows = sent_rows * replication
    active = expected_distinct(compute_experts, signature.top_k / E, source_tokens)
    instance_weight_bytes = signature.matrices_per_expert * D * hidden * b
    streamed = compute_experts if plan.expert_kernel == "bmm" else active
    gather_bytes, gather_group = _gather(plan, signature, world_size, shards)
    a2a_bytes = sent_rows * replication * D * b if (r > 0 and world_size > 1) else 0
    stored = E * signature.expert_weight_bytes // world_size
    per_matrix = compute_rows / max(streamed, 1e-9) if compute_rows else 0.0
    return CallShape(
        shards=shards, capacity=capacity, sent_rows=sent_rows, replication=replication,
        compute_rows=compute_rows, compute_experts=compute_experts, hidden_compute=hidden,
        active_experts=active, a2a_bytes=a2a_bytes, gather_bytes=gather_bytes,
        gather_group=gather_group, stored_weight_bytes=stored,
        flops=2.0 * signature.matrices_per_expert * compute_rows * D * hidden,
        weight_read_bytes=streamed * instance_weight_bytes, rows_per_matrix=per_matrix)


def peak_memory_bytes(shape: CallShape, signature: LayerSignature) -> tuple[float, float]:
    """(weight bytes, activation bytes) resident at the peak of the call on one rank."""
    b, D = signature.dtype_bytes, signature.model_dim
    weights = shape.stored_weight_bytes + shape.gather_bytes
    buffers = 2 * shape.sent_rows * shape.replication * D * b        # all-to-all in and out
    inner = shape.compute_rows * shape.hidden_compute * b * (signature.matrices_per_expert - 1)
    activations = buffers + inner
    if signature.training:
        weights *= 2            # gradients of the stored shard and of the gathered weights
        activations *= 2        # saved inputs and intermediates for backward
    return float(weights), float(activations)
