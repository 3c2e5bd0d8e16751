"""2-GPU (NCCL) parity of the parallel layouts with the single-process layer (fp32).

Same cases as tests/multiproc (dist_cases.parity_worker), run on cuda:0 and cuda:1. Launched by
scripts/gpu_dist.sh on the device machine; skipped without 2 GPUs.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multiproc"))

from harness import run_world  # noqa: E402
import dist_cases  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def test_parity_two_gpus_nccl():
    specs = [dict(E=4, D=16, H=32), dict(E=2, D=16, H=32, kind="gated_ffn"), dict(E=1, D=16, H=32, O=15)]
    run_world(2, dist_cases.parity_worker, specs, [[12, 12], [0, 10]], [1, 2, 4], ["flat", "2d"], [1.0, 0.0],
              "cuda", (1e-4, 1e-5), backend="nccl", env={"NCCL_NVLS_ENABLE": "0"},
              deadline_s=float(os.environ.get("ADAPTMOE_TEST_DEADLINE", 600)))
