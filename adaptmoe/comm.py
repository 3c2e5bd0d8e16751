"""Autograd collectives for the parallel executor, with an explicit process group everywhere.

Legend: W ranks in the group, L ranks per node (2D all-to-all), N = W/L nodes, g ranks of a
sub-group. Every function takes ``group`` as a keyword; ``None`` there means the default
(WORLD) group and is only ever passed on purpose (the layer's own default).

All-to-alls are written as exchanges: ``phase1`` issues the communication (asynchronously
when asked) and ``phase2`` completes it. An equal-split all-to-all is its own adjoint and the
2D hierarchical one is the same map as the flat one, so the backward of every exchange is the
same two phases run on the gradient (with swapped split sizes for the variable-size one). The
overlap pipeline in ``adaptmoe.parallel`` calls ``exchange_start`` for every chunk before the
experts of the first chunk run and ``exchange_finish`` just before each chunk is needed; in
backward the roles swap, so communication of one chunk overlaps expert compute of another in
both directions (async gloo work on CPU, NCCL's own stream on GPU).

Sub-groups (contiguous blocks, strided sets, the gloo mirror used for host-side metadata) are
created once per (ranks, backend) and cached. Creation uses group-local synchronisation, so
only the members call ``new_group`` (EP-in-node + DP-across-nodes layouts work, unlike Tutel's
"nesting groups" error), and ``prepare_groups`` creates them in one canonical order.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

_all_gather_1d = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_1d = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_GROUPS: dict[tuple[tuple[int, ...], str], Any] = {}


# ----------------------------------------------------------------------------- groups
def group_ranks(group: Any) -> tuple[int, ...]:
    """Global ranks of ``group`` in group-rank order (``None`` = WORLD)."""
    return tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


def backend_of(group: Any) -> str:
    return str(dist.get_backend(group)).lower()


def subgroup(group: Any, members: Sequence[int], backend: str | None = None) -> Any:
    """The sub-group of ``group`` holding the group-relative ranks ``members`` (this rank must be
    one). Cached per (global ranks, backend); only the members call ``new_group``."""
    parent = group_ranks(group)
    ranks = tuple(sorted(parent[m] for m in members))
    backend = backend or backend_of(group)
    if len(ranks) == len(parent) and backend == backend_of(group):
        return group
    key = (ranks, backend)
    if key not in _GROUPS:
        if [parent[m] for m in sorted(members)] != list(ranks):
            raise ValueError(f"sub-groups need the parent group's ranks in ascending order; group ranks {parent}")
        _GROUPS[key] = dist.new_group(list(ranks), backend=backend, use_local_synchronization=True)
    return _GROUPS[key]


def block_group(group: Any, size: int) -> Any | None:
    """Contiguous block of ``size`` group ranks holding this rank (None when size == 1)."""
    if size <= 1:
        return None
    rank = dist.get_rank(group)
    start = rank // size * size
    return subgroup(group, range(start, start + size))


def strided_group(group: Any, block: int) -> Any | None:
    """Ranks with this rank's index inside every block of ``block`` ranks (None when one block)."""
    world = dist.get_world_size(group)
    if block >= world:
        return None
    rank = dist.get_rank(group)
    return subgroup(group, range(rank % block, world, block))


def metadata_group(group: Any) -> Any:
    """A gloo mirror of ``group`` so small host-side agreements need no device sync."""
    if backend_of(group) == "gloo":
        return group
    key = (group_ranks(group), "gloo")
    if key not in _GROUPS:
        try:
            _GROUPS[key] = subgroup(group, range(dist.get_world_size(group)), backend="gloo")
        except (ValueError, RuntimeError):
            _GROUPS[key] = None   # e.g. the name is taken: fall back to a device all-reduce
    return _GROUPS[key]


def prepare_groups(group: Any, block_sizes: Sequence[int] = (), stride_blocks: Sequence[int] = (),
                   metadata: bool = False) -> None:
    """Create every sub-group a layer may use, in one order all members share (sizes ascending,
    then strided sets, then the metadata mirror). Safe to call again: groups are cached."""
    for size in sorted(set(block_sizes)):
        block_group(group, size)
    for block in sorted(set(stride_blocks)):
        strided_group(group, block)
    if metadata:
        metadata_group(group)


def agree_max(values: Sequence[int], *, group: Any, device: torch.device) -> list[int]:
    """Element-wise MAX of small host integers over the group (every rank gets the result)."""
    meta = metadata_group(group)
    if meta is not None:
        t = torch.tensor(list(values), dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=meta)
    else:
        t = torch.tensor(list(values), dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [int(v) for v in t.tolist()]


# ----------------------------------------------------------------------------- exchanges
class _Pending:
    """Work handles of one exchange in flight (forward and backward)."""
    __slots__ = ("work", "bwork", "extra", "bextra", "bbuf")

    def __init__(self):
        self.work = self.bwork = self.extra = self.bextra = self.bbuf = None


class Exchange:
    """All-to-all over the leading dim of a contiguous tensor; rows in destination-rank order."""

    def phase1(self, x: Tensor, async_op: bool) -> tuple[Tensor, Any, Any]:
        raise NotImplementedError

    def phase2(self, pending: Tensor, work: Any, extra: Any) -> Tensor:
        raise NotImplementedError

    def adjoint(self) -> "Exchange":
        return self


class FlatExchange(Exchange):
    """``all_to_all_single`` with equal splits ([W, ...] in, [W, ...] out) or with row splits."""

    def __init__(self, group: Any, in_splits: list[int] | None = None, out_splits: list[int] | None = None):
        self.group, self.in_splits, self.out_splits = group, in_splits, out_splits

    def phase1(self, x, async_op):
        if self.out_splits is None:
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
        else:
            out = x.new_empty((sum(self.out_splits), *x.shape[1:]))
        work = dist.all_to_all_single(out, x, self.out_splits, self.in_splits, group=self.group, async_op=async_op)
        return out, work, None

    def phase2(self, pending, work, extra):
        if work is not None:
            work.wait()
        return pending

    def adjoint(self):
        if self.in_splits is None:
            return self
        return FlatExchange(self.group, self.out_splits, self.in_splits)


class HierarchicalExchange(Exchange):
    """2D all-to-all: intra-node exchange, then inter-node exchange of L-times larger messages.

    Ranks are node-major (group rank = n*L + l). Input [W, ...] in destination order
    [n_dst, l_dst]; it is reordered to [l_dst, n_dst], exchanged inside the node (each local
    rank gets the N slices addressed to its local index), reordered to [n_dst, l_src] and
    exchanged among same-index ranks of all nodes, which yields [n_src, l_src]: exactly the
    flat all-to-all's result."""

    def __init__(self, intra: Any, inter: Any, local_size: int, nodes: int):
        self.intra, self.inter, self.L, self.N = intra, inter, local_size, nodes

    def phase1(self, x, async_op):
        rest = x.shape[1:]
        buf = x.reshape(self.N, self.L, -1).transpose(0, 1).contiguous()
        out = torch.empty_like(buf, memory_format=torch.contiguous_format)
        work = dist.all_to_all_single(out, buf, group=self.intra, async_op=async_op)
        return out, work, rest

    def phase2(self, pending, work, rest):
        if work is not None:
            work.wait()
        buf = pending.transpose(0, 1).contiguous()          # [n_dst, l_src, m]
        out = torch.empty_like(buf, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, buf, group=self.inter)  # [n_src, l_src, m]
        return out.reshape(self.N * self.L, *rest)


class _Phase1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ex, state, async_op):
        ctx.ex, ctx.state = ex, state
        pending, state.work, state.extra = ex.phase1(x.contiguous(), async_op)
        return pending

    @staticmethod
    def backward(ctx, _unused):
        # The gradient travels in ``state.bbuf`` (started by _Phase2.backward), not in the
        # argument: its shape is x's, which need not match the in-flight buffer's.
        st = ctx.state
        grad = ctx.ex.adjoint().phase2(st.bbuf, st.bwork, st.bextra)
        st.bbuf = st.bwork = st.bextra = None
        return grad, None, None, None


class _Phase2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pending, ex, state):
        ctx.ex, ctx.state = ex, state
        ctx.pending_meta = (pending.shape, pending.dtype, pending.device)
        out = ex.phase2(pending, state.work, state.extra)
        state.work = state.extra = None
        return out

    @staticmethod
    def backward(ctx, g):
        st = ctx.state
        st.bbuf, st.bwork, st.bextra = ctx.ex.adjoint().phase1(g.contiguous(), True)
        shape, dtype, device = ctx.pending_meta
        return torch.zeros((), dtype=dtype, device=device).expand(shape), None, None


def exchange_start(x: Tensor, ex: Exchange, async_op: bool = True) -> tuple[Tensor, _Pending]:
    """Issue ``ex`` on ``x``; the result is valid only after ``exchange_finish``."""
    state = _Pending()
    return _Phase1.apply(x, ex, state, async_op), state


def exchange_finish(started: tuple[Tensor, _Pending], ex: Exchange) -> Tensor:
    pending, state = started
    return _Phase2.apply(pending, ex, state)


def exchange(x: Tensor, ex: Exchange) -> Tensor:
    """Synchronous exchange with autograd (the backward runs the adjoint exchange)."""
    return exchange_finish(exchange_start(x, ex, async_op=False), ex)


def all_to_all(x_WX: Tensor, *, group: Any, intra: Any = None, inter: Any = None, local_size: int = 0) -> Tensor:
    """Equal-split all-to-all over dim 0 ([W, ...], row w goes to rank w), flat or 2D when
    ``intra``/``inter`` groups and ``local_size`` are given."""
    if intra is not None and inter is not None:
        W = dist.get_world_size(group)
        return exchange(x_WX, HierarchicalExchange(intra, inter, local_size, W // local_size))
    return exchange(x_WX, FlatExchange(group))


def all_to_all_v(x_RX: Tensor, in_splits: list[int], out_splits: list[int], *, group: Any) -> Tensor:
    """Variable-size all-to-all of rows: ``in_splits[w]`` rows go to rank w, ``out_splits[w]``
    arrive from rank w (both must be known: exchange counts first, see ``exchange_counts``)."""
    return exchange(x_RX, FlatExchange(group, list(in_splits), list(out_splits)))


def exchange_counts(counts_WX: Tensor, *, group: Any) -> Tensor:
    """Plain (no autograd) equal all-to-all of a small integer table [W, ...]."""
    counts_WX = counts_WX.contiguous()
    out = torch.empty_like(counts_WX, memory_format=torch.contiguous_format)
    dist.all_to_all_single(out, counts_WX, group=group)
    return out


# ----------------------------------------------------------------------------- gather / scatter
def _gather_flat(flat: Tensor, group: Any, size: int) -> Tensor:
    out = flat.new_empty(size * flat.numel())
    _all_gather_1d(out, flat, group=group)
    return out


def _reduce_scatter_flat(full: Tensor, group: Any, size: int) -> Tensor:
    out = full.new_empty(full.numel() // size)
    _reduce_scatter_1d(out, full, group=group)
    return out


class _GatherShards(torch.autograd.Function):
    """All-gather several tensors in one collective; backward reduce-scatters (sums) the grads."""

    @staticmethod
    def forward(ctx, group, size, *tensors):
        ctx.group, ctx.size = group, size
        ctx.shapes = [t.shape for t in tensors]
        ctx.numels = [t.numel() for t in tensors]
        flat = torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0].reshape(-1)
        full = _gather_flat(flat.contiguous(), group, size).view(size, -1)
        outs, offset = [], 0
        for shape, n in zip(ctx.shapes, ctx.numels):
            outs.append(full[:, offset:offset + n].reshape(size, *shape).clone(memory_format=torch.contiguous_format)
                        if len(tensors) > 1 else full.view(size, *shape))
            offset += n
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        size = ctx.size
        parts = [g.reshape(size, -1) if g is not None else grads_zero(size, n, grads)
                 for g, n in zip(grads, ctx.numels)]
        full = torch.cat(parts, dim=1).reshape(-1).contiguous() if len(parts) > 1 else parts[0].reshape(-1).contiguous()
        flat = _reduce_scatter_flat(full, ctx.group, size)
        out, offset = [], 0
        for shape, n in zip(ctx.shapes, ctx.numels):
            out.append(flat[offset:offset + n].view(shape))
            offset += n
        return (None, None, *out)


def grads_zero(size: int, n: int, grads) -> Tensor:
    ref = next(g for g in grads if g is not None)
    return ref.new_zeros(size, n)


def gather_shards(tensors: Sequence[Tensor], *, group: Any) -> list[Tensor]:
    """All-gather: each tensor [*S] becomes [g, *S] (rank order). Backward: reduce-scatter, so
    each stored shard receives the sum of the gradients of every rank that used it."""
    size = dist.get_world_size(group)
    tensors = list(tensors)
    if not tensors:
        return []
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1:
        raise TypeError(f"gather_shards needs one dtype, got {dtypes}")
    return list(_GatherShards.apply(group, size, *tensors))


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, size):
        ctx.group, ctx.size = group, size
        return _reduce_scatter_flat(x.contiguous().reshape(-1), group, size).view(x.shape[0] // size, *x.shape[1:])

    @staticmethod
    def backward(ctx, g):
        full = _gather_flat(g.contiguous().reshape(-1), ctx.group, ctx.size)
        return full.view(g.shape[0] * ctx.size, *g.shape[1:]), None, None


def reduce_scatter(x: Tensor, *, group: Any) -> Tensor:
    """Sum over the group, keep this rank's 1/W of dim 0. Backward: all-gather."""
    size = dist.get_world_size(group)
    if x.shape[0] % size:
        raise ValueError(f"reduce_scatter needs dim 0 ({x.shape[0]}) divisible by the group size {size}")
    return _ReduceScatter.apply(x, group, size)


def all_gather(x: Tensor, *, group: Any) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0. Backward: reduce-scatter (sum of the grads)."""
    (full,) = gather_shards([x], group=group)
    return full.reshape(full.shape[0] * full.shape[1], *full.shape[2:]) if x.dim() else full
