"""4-GPU (NCCL) parity of every parallel layout with the single-process layer (issue 7).

World 4 as 2 "nodes" of 2 GPUs (LOCAL_WORLD_SIZE=2, so '2d' is truly hierarchical): E in
{4, 8, 64} whole experts, E=2 (2 shards) and E=1 (4 shards: r in 0,1,2,4), every valid r,
d in {1, 2, 4}, flat and 2d, cf in {1, 0}, even and uneven token counts (a rank with none).
Launched by scripts/gpu_x4.sh on a 4-GPU machine; skipped with fewer GPUs.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multiproc"))

from harness import run_world  # noqa: E402
import dist_cases  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs")]


def test_parity_four_gpus_two_nodes_nccl():
    specs = [dict(E=4, D=16, H=32), dict(E=8, D=16, H=32, kind="gated_ffn"), dict(E=64, D=16, H=32, k=8),
             dict(E=2, D=16, H=32), dict(E=1, D=16, H=32, O=15)]
    run_world(4, dist_cases.parity_worker, specs, [[12, 12, 12, 12], [0, 10, 7, 13]], [1, 2, 4], ["flat", "2d"],
              [1.0, 0.0], "cuda", (1e-4, 1e-5), backend="nccl",
              env={"NCCL_NVLS_ENABLE": "0", "LOCAL_WORLD_SIZE": "2"})
