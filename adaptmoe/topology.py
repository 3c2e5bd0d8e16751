"""Where experts live in a process group: local experts, shards per expert, valid adaptive_r.

Legend: W ranks in the group, E global experts, e local experts, s ranks sharing one expert.
E >= W: each rank stores e = E/W whole experts (s = 1). E < W: s = W/E ranks each store a
1/s hidden slice of one expert. adaptive_r may be 0 (data parallel) or any divisor of s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from planner import valid_adaptive_rs


@dataclass(frozen=True)
class GroupLayout:
    world_size: int
    rank: int
    num_experts: int
    num_local_experts: int
    sharded_count: int
    local_size: int           # ranks per node, for the 2D hierarchical all-to-all

    @property
    def valid_rs(self) -> list[int]:
        return valid_adaptive_rs(self.sharded_count)


def group_size_and_rank(group: Any) -> tuple[int, int]:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialized; call "
                             "torch.distributed.init_process_group first (e.g. under torchrun)")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def local_size_for(world_size: int) -> int:
    """GPUs per node from the launcher (torchrun sets LOCAL_WORLD_SIZE); never a hand-set variable."""
    value = os.environ.get("LOCAL_WORLD_SIZE")
    if value is None or not value.isdigit() or int(value) < 1 or world_size % int(value):
        return world_size
    return int(value)


def split_experts(num_experts: int, world_size: int) -> tuple[int, int]:
    """(local experts, shards per expert) for E experts over W ranks."""
    if num_experts >= world_size:
        if num_experts % world_size:
            raise ValueError(f"num_experts ({num_experts}) must be a multiple of the group size ({world_size}) "
                             f"or divide it")
        return num_experts // world_size, 1
    if world_size % num_experts:
        raise ValueError(f"group size ({world_size}) must be a multiple of num_experts ({num_experts}) "
                         f"when there are fewer experts than ranks")
    return 1, world_size // num_experts


def group_local_size(group: Any, world_size: int) -> int:
    """Ranks of ``group`` per node: members are placed by their global rank (node = global rank //
    LOCAL_WORLD_SIZE). A group that is not node-major with equal members per node gets
    ``world_size`` (one "node": the 2D all-to-all then degenerates to the flat one)."""
    import torch.distributed as dist
    per_node = os.environ.get("LOCAL_WORLD_SIZE")
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return local_size_for(world_size)
    if per_node is None or not per_node.isdigit() or int(per_node) < 1:
        return world_size
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    nodes = [r // int(per_node) for r in ranks]
    size = nodes.count(nodes[0])
    blocks = [nodes[i:i + size] for i in range(0, len(nodes), size)]
    node_major = all(len(set(b)) == 1 and b.count(b[0]) == size for b in blocks) and \
        len({b[0] for b in blocks}) == len(blocks)
    return size if node_major and world_size % size == 0 else world_size


def layout_for_group(group: Any, num_experts: int, local_size: int | None = None) -> GroupLayout:
    world_size, rank = group_size_and_rank(group)
    local, shards = split_experts(num_experts, world_size)
    return GroupLayout(world_size, rank, num_experts, local, shards,
                       local_size if local_size is not None else group_local_size(group, world_size))
