"""Enumerate plans, cost the feasible ones, explain the rest; cheapest first.

The space is small (R values x overlap degrees x algorithms x kernels: a few hundred at most), so
the search is exhaustive: every candidate is costed, which is what lets `whatif` print why each
runner-up lost. A 2048-rank what-if costs well under a second.
"""
from __future__ import annotations

from typing import Sequence

from planner.cost import estimate, feasibility
from planner.device import DeviceModel
from planner.plan import A2A_ALGOS, EXPERT_KERNELS, Candidate, LayerSignature, Plan
from planner.shapes import shards_per_expert
from planner.topology import Topology


class NoFeasiblePlan(ValueError):
    """No candidate can run; the message lists each distinct reason."""


def candidate_rs(shards: int) -> list[int]:
    """R values to consider, in tie-break order: EP first (Tutel's default), then the divisors of
    S, then powers of two that are not divisors (so the table shows why they are invalid), then
    data parallel."""
    divisors = [r for r in range(2, shards + 1) if shards % r == 0]
    powers, p = [], 2
    while p <= max(shards, 2):
        powers.append(p)
        p *= 2
    others = sorted(set(divisors) | set(powers))
    return [1] + others + [0]


def enumerate_plans(shards: int, *, adaptive_rs: Sequence[int] | None = None,
                    overlap_degrees: Sequence[int] = (1, 2, 4, 8),
                    algos: Sequence[str] = A2A_ALGOS,
                    kernels: Sequence[str] | None = None) -> list[Plan]:
    rs = list(adaptive_rs) if adaptive_rs is not None else candidate_rs(shards)
    return [Plan(adaptive_r=r, overlap_degree=d, a2a_algo=a, expert_kernel=k)
            for r in rs for d in overlap_degrees for a in algos
            for k in (kernels if kernels is not None else EXPERT_KERNELS)]


def evaluate(plan: Plan, signature: LayerSignature, tokens_per_rank: int,
             topology: Topology, device: DeviceModel) -> Candidate:
    """One candidate: its reasons if infeasible, else its predicted time and breakdown."""
    reasons = feasibility(plan, signature, tokens_per_rank, topology, device)
    if reasons:
        return Candidate(plan=plan, predicted_ms=None, rejected=reasons)
    ms, breakdown = estimate(plan, signature, tokens_per_rank, topology, device)
    return Candidate(plan=plan, predicted_ms=ms, rejected=[], breakdown=breakdown)


def rank_plans(signature: LayerSignature, tokens_per_rank: int, topology: Topology,
               device: DeviceModel, *, overlap_degrees: Sequence[int] = (1, 2, 4, 8),
               algos: Sequence[str] = A2A_ALGOS, kernels: Sequence[str] | None = None,
               adaptive_rs: Sequence[int] | None = None) -> list[Candidate]:
    """Every candidate: feasible ones by predicted time (ties keep enumeration order), then the
    infeasible ones with their reasons."""
    shards = shards_per_expert(signature.num_experts, topology.world_size)
    plans = enumerate_plans(shards, adaptive_rs=adaptive_rs, overlap_degrees=overlap_degrees,
                            algos=algos, kernels=kernels)
    candidates = [evaluate(p, signature, tokens_per_rank, topology, device) for p in plans]
    # Host-bound calls all predict the same (measured) shortest call time; among those, less
    # device work still wins on real hardware, so device time breaks the tie. sorted() is stable:
    # exact ties keep the enumeration (tie-break) order.
    feasible = sorted((c for c in candidates if c.feasible),
                      key=lambda c: (c.predicted_ms, c.predicted_ms - c.breakdown.get("host", 0.0)))
    return feasible + [c for c in candidates if not c.feasible]


def best_plan(signature: LayerSignature, tokens_per_rank: int, topology: Topology,
              device: DeviceModel, **space) -> Candidate:
    """The cheapest feasible candidate; raises NoFeasiblePlan naming every reason otherwise."""
    ranked = rank_plans(signature, tokens_per_rank, topology, device, **space)
    if ranked and ranked[0].feasible:
        return ranked[0]
    reasons = sorted({reason for c in ranked for reason in c.rejected})
    raise NoFeasiblePlan(f"no feasible plan for {signature.key()} at {tokens_per_rank} tokens "
                         f"per rank on {topology.world_size} ranks: " + "; ".join(reasons))
