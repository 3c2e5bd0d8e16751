"""Search agrees with brute force; the what-if simulation reproduces Tutel's qualitative results."""
import itertools

import pytest

from planner import (DeviceModel, LayerSignature, NoFeasiblePlan, Plan, Topology, best_plan,
                     estimate, feasibility, rank_plans)
from planner.cost import a2a_seconds
from planner.search import candidate_rs

H100 = DeviceModel.preset("H100")
SMALL_CASES = [
    (LayerSignature(1024, 4096, 2, 2), 512, (2, 2)),                 # E < W: S = 2
    (LayerSignature(1024, 4096, 8, 2, training=False), 16, (2, 2)),
    (LayerSignature(512, 1024, 4, 1, capacity_factor=0.0), 2048, (1, 4)),
    (LayerSignature(512, 1024, 1, 1, capacity_factor=-2.0), 64, (4, 2)),  # S = 8
]


@pytest.mark.parametrize("sig, tokens, shape", SMALL_CASES)
def test_rank_plans_agrees_with_brute_force(sig, tokens, shape):
    topo = Topology.from_cluster(shape[0], shape[1], 200, 20)
    space = list(itertools.product(range(0, 9), (1, 2, 4), ("flat", "2d"),
                                   ("bmm", "grouped", "decode")))
    brute = {}
    for r, d, algo, kernel in space:
        plan = Plan(r, d, algo, kernel)
        if not feasibility(plan, sig, tokens, topo, H100):
            brute[plan] = estimate(plan, sig, tokens, topo, H100)[0]
    ranked = rank_plans(sig, tokens, topo, H100, overlap_degrees=(1, 2, 4),
                        adaptive_rs=range(0, 9))
    feasible = [c for c in ranked if c.feasible]
    assert {c.plan: c.predicted_ms for c in feasible} == pytest.approx(brute)
    assert [c.predicted_ms for c in feasible] == sorted(brute.values())
    assert all(c.rejected and c.predicted_ms is None for c in ranked[len(feasible):])
    assert len(ranked) == len(space)
    best = best_plan(sig, tokens, topo, H100, overlap_degrees=(1, 2, 4), adaptive_rs=range(0, 9))
    assert best.predicted_ms == min(brute.values())


def test_default_space_covers_every_valid_r_and_explains_invalid_ones():
    assert candidate_rs(1) == [1, 2, 0]
    assert candidate_rs(6) == [1, 2, 3, 4, 6, 0]
    topo = Topology.from_cluster(1, 8, 300, 25)
    sharded = rank_plans(LayerSignature(1024, 4096, 2, 2), 256, topo, H100)
    assert {c.plan.adaptive_r for c in sharded if c.feasible} == {0, 1, 2, 4}
    whole = rank_plans(LayerSignature(1024, 4096, 8, 2), 256, topo, H100)
    reasons = {r for c in whole for r in c.rejected}
    assert "adaptive_r=2 needs the 1 shard(s) of each expert divisible by 2 " \
           "(valid: [0, 1])" in reasons
    assert "2d all-to-all needs more than one node (1 node of 8 GPUs)" in reasons


def test_ties_prefer_expert_parallel_on_one_gpu():
    best = best_plan(LayerSignature(4096, 14336, 8, 2), 8192, Topology.from_cluster(1, 1, 1, 1),
                     H100)
    assert best.plan == Plan(1, 1, "flat", "bmm")


def test_no_feasible_plan_lists_the_reasons():
    with pytest.raises(NoFeasiblePlan, match="num_experts 12 must be divisible by the world "
                                             "size 8"):
        best_plan(LayerSignature(64, 128, 12, 2), 64, Topology.from_cluster(1, 8, 300, 25), H100)


# -- what-if simulation: Tutel's qualitative results -------------------------------------------
def _best_algo(nodes, gpus, tokens, training=True):
    sig = LayerSignature(4096, 14336, max(64, nodes * gpus), 2, training=training)
    return best_plan(sig, tokens, Topology.from_cluster(nodes, gpus, 300, 25), H100).plan.a2a_algo


@pytest.mark.parametrize("nodes, gpus", [(1, 2), (1, 8), (2, 8)])
@pytest.mark.parametrize("tokens", [64, 512, 4096, 65536])
def test_small_clusters_pick_flat_all_to_all(nodes, gpus, tokens):
    assert _best_algo(nodes, gpus, tokens) == "flat"


def test_hundreds_of_gpus_pick_2d_for_small_messages_and_flat_for_large():
    assert _best_algo(64, 8, 512) == "2d"         # 512 GPUs, ~8 MiB per rank
    assert _best_algo(64, 8, 65536) == "flat"     # 512 GPUs, ~1 GiB per rank
    assert _best_algo(32, 8, 64, training=False) == "2d"


def test_2d_crossover_moves_with_scale_and_message_size():
    dev = H100
    def two_d_wins(nodes, mib):
        topo = Topology.from_cluster(nodes, 8, 300, 25)
        b = mib * 2 ** 20
        return a2a_seconds(Plan(1, 1, "2d"), b, topo, dev) < a2a_seconds(Plan(1, 1, "flat"), b,
                                                                         topo, dev)
    assert not any(two_d_wins(nodes, mib) for nodes in (2, 4, 8) for mib in (0.25, 1, 16, 256))
    assert all(two_d_wins(nodes, 1) for nodes in (32, 64, 128, 256))
    assert not any(two_d_wins(nodes, 256) for nodes in (32, 64, 128, 256))


def test_best_adaptive_r_changes_with_tokens():
    # E=2 experts on 8 GPUs (S=4): few tokens -> replicate tokens, keep weights still (R=S);
    # mid -> expert parallel gathering the 4 shards (R=1); many tokens on tiny all-to-all
    # budget -> data parallel (R=0) moves weights instead of tokens
    topo = Topology.from_cluster(1, 8, 300, 25)
    sig = LayerSignature(4096, 14336, 2, 2)
    best_r = {t: best_plan(sig, t, topo, H100).plan.adaptive_r for t in (64, 4096, 16384)}
    assert best_r == {64: 4, 4096: 1, 16384: 0}


def test_data_parallel_wins_for_tiny_experts_and_loses_for_big_ones():
    topo = Topology.from_cluster(1, 8, 300, 25)
    tiny = best_plan(LayerSignature(256, 256, 8, 2), 16384, topo, H100)
    big = best_plan(LayerSignature(4096, 14336, 8, 2), 16384, topo, H100)
    assert tiny.plan.adaptive_r == 0
    assert big.plan.adaptive_r == 1


def test_decode_kernel_wins_small_inference_batches_only():
    sig = LayerSignature(4096, 14336, 8, 2, training=False, capacity_factor=0.0)
    one = Topology.from_cluster(1, 1, 300, 25)
    assert best_plan(sig, 1, one, H100).plan.expert_kernel == "decode"
    assert best_plan(sig, 8192, one, H100).plan.expert_kernel == "grouped"


def test_whatif_for_2048_gpus_ranks_every_candidate():
    sig = LayerSignature(4096, 14336, 64, 2)
    topo = Topology.from_cluster(256, 8, 300, 25)
    ranked = rank_plans(sig, 4096, topo, H100)
    assert len(ranked) == 7 * 4 * 2 * 3          # R in {1,2,4,8,16,32,0} x d x algo x kernel
    assert ranked[0].feasible and ranked[0].plan.a2a_algo == "2d"


def test_host_bound_plans_are_ranked_by_their_device_work():
    import dataclasses
    topo = Topology.from_cluster(1, 4, 300, 25)
    sig = LayerSignature(1024, 2048, 2, 2, training=True)
    plain = rank_plans(sig, 1024, topo, DeviceModel.preset("H100"))
    host_bound = dataclasses.replace(DeviceModel.preset("H100"), train_call_overhead_us=1e6)   # 1 s per call
    ranked = rank_plans(sig, 1024, topo, host_bound)
    # four ranks: collectives in the call absorb the host's work, so a call takes the longer only
    assert all(c.predicted_ms == pytest.approx(1000.0) for c in ranked if c.feasible)
    assert [c.plan for c in ranked] == [c.plan for c in plain]     # same order as by device time
