"""Tutel-style communication helpers (``tutel.net`` names and arguments), over ``adaptmoe.comm``.

Legend: W ranks in the group. Like Tutel, ``group=None`` here means the default (WORLD) group:
this module is the compatibility surface. Differences from Tutel, on purpose:
- ``batch_all_to_all_v`` / ``batch_all_gather_v`` work on any group and backend (gloo, NCCL),
  need no second NCCL communicator, and have autograd.
- ``all_to_all(..., use_2dh=True)`` honours ``group``; its node size comes from
  LOCAL_WORLD_SIZE (torchrun) and the group's members, never from a hand-set LOCAL_SIZE.
- ``create_groups_from_world`` may split a sub-group (Tutel #292 raises there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from . import comm
from .topology import group_local_size

__all__ = ["get_world_size", "get_world_rank", "barrier", "all_to_all", "all_gather", "reduce_scatter",
           "batch_all_to_all_v", "batch_all_gather_v", "create_groups_from_world", "ParallelEnv"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size(group: Any = None) -> int:
    return dist.get_world_size(group) if _initialized() else 1


def get_world_rank(group: Any = None) -> int:
    return dist.get_rank(group) if _initialized() else 0


def barrier(group: Any = None) -> None:
    if _initialized():
        dist.barrier(group=group)


def _exchange_for(group: Any, use_2dh: bool) -> comm.Exchange:
    W = get_world_size(group)
    if use_2dh:
        L = group_local_size(group, W)
        if 1 < L < W:
            return comm.HierarchicalExchange(comm.block_group(group, L), comm.strided_group(group, L), L, W // L)
    return comm.FlatExchange(group)


def all_to_all(x: Tensor, input_dim: int, output_dim: int, group: Any = None, use_2dh: bool = False) -> Tensor:
    """Split ``x`` along ``output_dim`` into W pieces (piece w goes to rank w) and concatenate
    what arrives along ``input_dim`` in source-rank order. Backward: the transposed exchange."""
    W = get_world_size(group)
    if W == 1:
        return x
    nd = x.dim()
    input_dim, output_dim = input_dim % nd, output_dim % nd
    n = x.shape[output_dim]
    if n % W:
        raise ValueError(f"all_to_all: dim {output_dim} ({n}) must be divisible by the group size {W}")
    split = x.reshape(*x.shape[:output_dim], W, n // W, *x.shape[output_dim + 1:]).movedim(output_dim, 0)
    recv = comm.exchange(split, _exchange_for(group, use_2dh))          # [W_src, *piece]
    moved = recv.movedim(0, input_dim)                                   # W just before input_dim
    shape = list(recv.shape[1:])
    shape[input_dim] *= W
    return moved.reshape(shape)


class _GatherOwnSliceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.rank, ctx.n = dim, dist.get_rank(group), x.shape[dim]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, g):
        return g.narrow(ctx.dim, ctx.rank * ctx.n, ctx.n), None, None


def all_gather(x: Tensor, dim: int = 0, group: Any = None, fused: bool = False) -> Tensor:
    """Concatenate every rank's ``x`` along ``dim``. Backward as Tutel's: ``fused=False`` keeps
    this rank's slice of the gradient (downstream compute replicated on every rank),
    ``fused=True`` reduce-scatters it (the sum over ranks: the true gradient in general)."""
    if get_world_size(group) == 1:
        return x
    dim = dim % x.dim()
    if not fused:
        return _GatherOwnSliceGrad.apply(x, dim, group)
    moved = x.movedim(dim, 0)
    return comm.all_gather(moved, group=group).movedim(0, dim)


def reduce_scatter(x: Tensor, dim: int = 0, group: Any = None) -> Tensor:
    """Sum over ranks and keep this rank's 1/W of ``dim``. Backward: all-gather."""
    if get_world_size(group) == 1:
        return x
    dim = dim % x.dim()
    return comm.reduce_scatter(x.movedim(dim, 0), group=group).movedim(0, dim)


def _counts_list(counts, W: int) -> list[int]:
    values = counts.tolist() if isinstance(counts, Tensor) else list(counts)
    if len(values) != W:
        raise ValueError(f"counts must hold one element count per rank ({W}), got {len(values)}")
    return [int(v) for v in values]


def batch_all_to_all_v(tensors: Sequence[Tensor], counts, group: Any = None) -> tuple[list[Tensor], Tensor]:
    """Variable-size all-to-all of several tensors with the same element count: ``counts[w]``
    elements of each (flattened) tensor go to rank w. The counts are exchanged first.
    Returns (1-D outputs in source-rank order, elements received from each rank)."""
    tensors = list(tensors)
    W = get_world_size(group)
    sizes = _counts_list(counts, W)
    if any(t.numel() != sum(sizes) for t in tensors):
        raise ValueError(f"every tensor must hold sum(counts) = {sum(sizes)} elements, got "
                         f"{[t.numel() for t in tensors]}")
    device = tensors[0].device if tensors else torch.device("cpu")
    if W == 1:
        return [t.reshape(-1) for t in tensors], torch.tensor(sizes, dtype=torch.int64)
    send = torch.tensor(sizes, dtype=torch.int64, device=device)
    out_counts = comm.exchange_counts(send, group=group).cpu()
    out_sizes = out_counts.tolist()
    outputs = [comm.all_to_all_v(t.reshape(-1), sizes, out_sizes, group=group) for t in tensors]
    return outputs, out_counts


class _GatherV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        rank = dist.get_rank(group)
        ctx.group, ctx.lo, ctx.n = group, sum(sizes[:rank]), sizes[rank]
        width = max(sizes)
        padded = x.new_zeros(width)
        padded[:x.numel()] = x
        full = x.new_empty(width * len(sizes))
        comm._all_gather_1d(full, padded, group=group)
        full = full.view(len(sizes), width)
        return torch.cat([full[w, :n] for w, n in enumerate(sizes)])

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g[ctx.lo:ctx.lo + ctx.n], None, None


def batch_all_gather_v(tensors: Sequence[Tensor], group: Any = None) -> tuple[list[Tensor], list[list[int]]]:
    """Concatenate each tensor (flattened; lengths may differ per rank) over ranks in rank order.
    Returns (1-D outputs, per tensor the element count each rank contributed). Backward: the
    sum over ranks of the gradient of this rank's piece."""
    tensors = list(tensors)
    W = get_world_size(group)
    if W == 1:
        return [t.reshape(-1) for t in tensors], [[t.numel()] for t in tensors]
    device = tensors[0].device if tensors else torch.device("cpu")
    mine = torch.tensor([t.numel() for t in tensors], dtype=torch.int64, device=device)
    table = mine.new_empty(W * mine.numel())
    comm._all_gather_1d(table, mine, group=group)
    table = table.view(W, -1).cpu()
    outputs, sizes = [], []
    for i, t in enumerate(tensors):
        per_rank = table[:, i].tolist()
        outputs.append(_GatherV.apply(t.reshape(-1), per_rank, group))
        sizes.append(per_rank)
    return outputs, sizes


@dataclass(frozen=True)
class ParallelEnv:
    """Tutel's topology record: model groups are contiguous rank blocks, data groups strided."""

    global_size: int
    global_rank: int
    group_count: int
    data_rank: int
    model_size: int
    model_rank: int
    data_group: Any
    model_group: Any
    global_group: Any
    is_distributed: bool

    def dist_print(self, *args, **kwargs) -> None:
        if self.global_rank == 0:
            print(*args, **kwargs)


def create_groups_from_world(group_count: int, parent_group: Any = None) -> ParallelEnv:
    """Split ``parent_group`` (WORLD when None; a sub-group works too) into ``group_count``
    contiguous model groups (a negative value -n means model groups of n ranks) and the
    strided data groups across them. Only the members of each new group take part in creating
    it, and the groups are cached, so every layer may call this."""
    if not _initialized():
        return ParallelEnv(1, 0, 1, 0, 1, 0, None, None, None, False)
    W, rank = dist.get_world_size(parent_group), dist.get_rank(parent_group)
    if not isinstance(group_count, int) or group_count == 0:
        raise ValueError(f"group_count must be a non-zero integer, got {group_count!r}")
    model_size = -group_count if group_count < 0 else W // group_count
    if model_size < 1 or W % model_size or (group_count > 0 and W % group_count):
        raise ValueError(f"group_count {group_count} does not split a group of {W} ranks evenly")
    data_size = W // model_size
    model_group = comm.subgroup(parent_group, range(rank // model_size * model_size,
                                                    rank // model_size * model_size + model_size))
    data_group = comm.subgroup(parent_group, range(rank % model_size, W, model_size))
    global_group = parent_group if parent_group is not None else dist.group.WORLD
    return ParallelEnv(W, rank, data_size, rank // model_size, model_size, rank % model_size,
                       data_group, model_group, global_group, True)
