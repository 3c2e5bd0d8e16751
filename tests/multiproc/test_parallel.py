"""Multi-process (gloo, CPU) parity of every parallel layout with the single-process layer.

One world per test; each worker loops over all its configurations (see dist_cases.py).
World 2: whole experts (E=4, E=2) and one expert sharded over both ranks (E=1, s=2).
World 8 as 2 nodes x 4 ranks: E in {4, 8, 64}.
World 4 as 2 nodes x 2 ranks (LOCAL_WORLD_SIZE=2, so '2d' is truly hierarchical): E=8,
E=2 (s=2), E=1 (s=4, odd output dim), plus pre-score and gated experts.
Every r in valid_rs, d in {1, 2, 4}, flat and 2d, cf in {1, 0}, even and uneven token counts
(a rank with none among them).
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import run_world  # noqa: E402
import dist_cases  # noqa: E402

pytestmark = pytest.mark.slow
ALL = dict(degrees=[1, 2, 4], algos=["flat", "2d"], cfs=[1.0, 0.0])


def test_parity_world2():
    specs = [dict(E=4), dict(E=2, postscore=False), dict(E=1)]
    run_world(2, dist_cases.parity_worker, specs, [[7, 9], [0, 10]], ALL["degrees"], ALL["algos"], ALL["cfs"])


def test_parity_world4_two_nodes():
    specs = [dict(E=8), dict(E=2, kind="gated_ffn"), dict(E=1, O=7)]
    run_world(4, dist_cases.parity_worker, specs, [[8, 8, 8, 8], [6, 0, 11, 9]], ALL["degrees"], ALL["algos"],
              ALL["cfs"], env={"LOCAL_WORLD_SIZE": "2"})


def test_checkpoint_across_world_sizes(tmp_path):
    run_world(4, dist_cases.checkpoint_worker, str(tmp_path))


def test_grad_sync_ep_in_node_dp_across():
    run_world(4, dist_cases.grad_sync_worker, env={"LOCAL_WORLD_SIZE": "2"})


def test_net_helpers():
    run_world(4, dist_cases.net_worker, env={"LOCAL_WORLD_SIZE": "2"})


def test_parity_world8_two_nodes_of_four():
    # Issue 7's layout on CPU: 2 nodes x 4 ranks, E < W (s = 2), E = W, and E = 8 W.
    specs = [dict(E=4), dict(E=8), dict(E=64, k=8)]
    run_world(8, dist_cases.parity_worker, specs, [[6] * 8, [5, 0, 7, 3, 9, 2, 6, 4]], ALL["degrees"], ALL["algos"],
              ALL["cfs"], env={"LOCAL_WORLD_SIZE": "4"})


def test_custom_experts_other_output_width():
    # A rank with no rows / a zero capacity must still answer [T, O] and join every exchange.
    run_world(2, dist_cases.custom_experts_worker, deadline_s=60)


def test_planner_ranks_agree_and_reuse_the_cache(tmp_path):
    import planning_cases
    run_world(2, planning_cases.agreement_worker, str(tmp_path / "plans.msgpack"))
