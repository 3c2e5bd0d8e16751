"""FastMoE's DistributedGroupedDataParallel and ColossalAI's MoE groups over 2 real gloo processes."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "multiproc"))
from harness import run_world  # noqa: E402

import compat_dist_cases  # noqa: E402


@pytest.mark.slow
def test_grouped_data_parallel_and_groups_over_two_ranks():
    run_world(2, compat_dist_cases.all_cases, deadline_s=180)
