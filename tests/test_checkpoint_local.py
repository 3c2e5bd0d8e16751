"""Checkpoints in one process: round trip, and a directory reused across world sizes."""
import shutil

import torch

import adaptmoe as am
from adaptmoe import checkpoint


def build(seed):
    torch.manual_seed(seed)
    return am.MoELayer(am.MoEConfig(model_dim=8, num_experts=4, experts=am.ExpertConfig(hidden_size=16)))


def test_round_trip_ignores_shards_left_by_a_save_at_another_world_size(tmp_path):
    source = build(0)
    checkpoint.save(source, str(tmp_path))
    # shards of an earlier 2-rank save in the same directory (names carry the world size)
    shard = tmp_path / "experts.rank0-of1.pt"
    shutil.copy(shard, tmp_path / "experts.rank0-of2.pt")
    shutil.copy(shard, tmp_path / "experts.rank1-of2.pt")
    target = build(1)
    checkpoint.load(target, str(tmp_path))
    x = torch.randn(6, 8)
    torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
