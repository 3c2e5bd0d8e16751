"""One MoE call over a process group, as data, expert or model parallel chosen per call.

Legend: T tokens on this rank, D model dim, O output dim, H hidden, E global experts, e local
experts, K top-k, C capacity (slots per expert per source rank), Cp C padded to a multiple of
s*d, W ranks, s ranks sharing one expert (W/E when E < W), r = adaptive_r, g = s/r ranks that
gather one hidden slice, d overlap chunks, R rows.

Semantics are Tutel's (tutel-semantics.md 2.9-2.12), with the same stored layout for every
r and d (parameters never move; gathers are transient and their backward reduce-scatters):
- r = 0, data parallel: no token exchange; every rank gathers all experts' weights over the
  group and runs all E experts on its own tokens.
- r >= 1 (r divides s): each expert's slots are repeated r times and split into s pieces;
  rank e*s + j of expert e gets piece j (copy j // g, sub-slice j % g), gathers the hidden
  slice j // g over its contiguous block of g ranks, and returns a partial sum that the source
  adds over the r copies (the output bias is gathered over the s ranks and scaled by 1/r so it
  is added once). r = 1 is expert parallel (+ data parallel inside a sharded expert), r = s
  is Megatron-style model parallel.
- d > 1 splits the capacity dim (dropless: each expert's rows) into d chunks; all chunks'
  exchanges are issued before the experts of chunk 0 run, and each chunk's return exchange
  is issued as soon as its experts finish (``adaptmoe.comm``), forward and backward.
- Capacity mode: ranks agree on C from the MAX token count (a host-side all-reduce), so
  uneven or empty ranks never hang (Tutel #173). C is padded to Cp with rows no slot uses,
  which keeps routing identical to the single-process layer at the agreed capacity.
- Dropless: per-expert counts are exchanged first, then rows move with split sizes
  (all_to_all_v) and experts run grouped. The 2D algorithm applies to equal-split exchanges;
  variable-size ones always use the flat all-to-all.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import comm
from . import dispatch as dispatch_ops
from .expert_compute import FFNWeights
from .executor import CallKnobs, gate_scales
from .routing import Routing, capacity_for
from .topology import GroupLayout

__all__ = ["run_parallel", "with_capacity", "padded_capacity", "gathered_weights", "prepare"]

_PREPARED: set = set()


def prepare(layout: GroupLayout, group: Any) -> None:
    """Create every sub-group any r / algorithm of this layout can use, once, in a fixed order."""
    key = (comm.group_ranks(group), layout.sharded_count, layout.local_size)
    if key in _PREPARED:
        return
    s, W, L = layout.sharded_count, layout.world_size, layout.local_size
    blocks = [s // r for r in layout.valid_rs if r > 0] + [s]
    strides = []
    if 1 < L < W:
        blocks.append(L)
        strides.append(L)
    comm.prepare_groups(group, block_sizes=[b for b in blocks if b > 1], stride_blocks=strides,
                        metadata=True)
    _PREPARED.add(key)


def padded_capacity(capacity: int, sharded_count: int, overlap_degree: int) -> int:
    align = sharded_count * overlap_degree
    return -(-capacity // align) * align


def with_capacity(routing: Routing, capacity: int, row_stride: int | None = None) -> Routing:
    """The same choices at another capacity (choices at location >= capacity are dropped);
    slot = expert * row_stride + location (row_stride >= capacity pads each expert)."""
    stride = capacity if row_stride is None else row_stride
    kept_TK = routing.locations_TK < capacity
    slots_TK = torch.where(kept_TK, routing.indices_TK * stride + routing.locations_TK,
                           torch.full_like(routing.indices_TK, -1))
    return Routing(routing.indices_TK, routing.weights_TK, routing.locations_TK, routing.counts_E, capacity,
                   slots_TK, routing.counts_E.numel() * stride)


# ----------------------------------------------------------------------------- weights
def gathered_weights(experts, layout: GroupLayout, r: int, group: Any) -> FFNWeights | None:
    """The weights this rank computes with at adaptive_r = r (None: custom experts, stored)."""
    if not hasattr(experts, "stored_weights"):
        return None
    s, W, E = layout.sharded_count, layout.world_size, layout.num_experts
    w1, w2, b1, b2, w3 = experts.batched_fc1_w, experts.batched_fc2_w, experts.batched_fc1_bias, \
        experts.batched_fc2_bias, experts.batched_fc3_w
    O = experts.output_dim
    names = ["w1", "w2", "b1", "b2", "w3"]
    params = dict(zip(names, (w1, w2, b1, b2, w3)))
    present = [n for n in names if params[n] is not None]
    if r == 0:
        full = dict(zip(present, comm.gather_shards([params[n] for n in present], group=group)))
        if s == 1:   # [W, e, ...] -> [E, ...]
            out = {n: t.reshape(E, *t.shape[2:]) for n, t in full.items()}
        else:        # [W, 1, h, ...] -> [E, s*h, ...]: rank order is expert-major, then hidden slice
            out = {n: t.reshape(E, s * t.shape[2], *t.shape[3:]) for n, t in full.items()}
        if "b2" in out:
            out["b2"] = out["b2"][:, :O]
        return FFNWeights(out["w1"], out["w2"], out.get("b1"), out.get("b2"), out.get("w3"))
    if s == 1:
        return experts.stored_weights()
    g = s // r
    hidden = [n for n in present if n != "b2"]
    out: dict[str, Tensor] = {}
    if g > 1:
        block = comm.block_group(group, g)
        tensors = [params[n] for n in hidden]
        if "b2" in present and g == s:
            tensors.append(b2)   # same group: one collective for all
        full = comm.gather_shards(tensors, group=block)
        for n, t in zip(hidden + (["b2"] if len(tensors) > len(hidden) else []), full):
            out[n] = t.reshape(1, g * t.shape[2], *t.shape[3:])   # [g, 1, h, ...] -> [1, g*h, ...]
    else:
        out.update({n: params[n] for n in hidden})
    if "b2" in present:
        if "b2" not in out:
            (full_b2,) = comm.gather_shards([b2], group=comm.block_group(group, s))
            out["b2"] = full_b2.reshape(1, -1)
        out["b2"] = out["b2"][:, :O]
        if r > 1:
            out["b2"] = out["b2"] * (1.0 / r)
    return FFNWeights(out["w1"], out["w2"], out.get("b1"), out.get("b2"), out.get("w3"))


def _run_padded(experts, x_eCD: Tensor, weights: FFNWeights | None) -> Tensor:
    return experts(x_eCD) if weights is None else experts(x_eCD, weights)


def _run_grouped(experts, x_RD: Tensor, counts_e: Tensor, weights: FFNWeights | None) -> Tensor:
    if x_RD.shape[0] == 0:
        # No rows here (e.g. a rank without tokens). The inputs and the gathered weights must
        # still reach the loss: their backward runs collectives that every rank has to join.
        anchor = x_RD.sum() * 0
        if weights is not None:
            anchor = anchor + sum(t.sum() for t in weights if t is not None) * 0
        return x_RD.new_zeros(0, _output_dim(experts, x_RD)) + anchor
    return experts.forward_grouped(x_RD, counts_e) if weights is None else \
        experts.forward_grouped(x_RD, counts_e, weights)


def _combine(y_RO: Tensor, routing: Routing, combine_TK: Tensor) -> Tensor:
    y_TO = dispatch_ops.combine(y_RO, routing.slots_TK, combine_TK)
    if routing.slots_TK.shape[0] == 0:
        # No tokens: a combine kernel may return no gradient for y_RO, which would skip this
        # rank's part of the exchanges' backward; keep y_RO in the graph.
        y_TO = y_TO + y_RO.sum() * 0
    return y_TO


def _exchange_for(knobs: CallKnobs, layout: GroupLayout, group: Any) -> comm.Exchange:
    L, W = layout.local_size, layout.world_size
    if knobs.a2a_algo == "2d" and 1 < L < W:
        return comm.HierarchicalExchange(comm.block_group(group, L), comm.strided_group(group, L), L, W // L)
    return comm.FlatExchange(group)


# ----------------------------------------------------------------------------- entry point
def run_parallel(x_TD: Tensor, routing: Routing, experts, knobs: CallKnobs, layout: GroupLayout, *,
                 is_postscore: bool, group: Any = None) -> Tensor:
    """y_TO for this rank's tokens; ``group`` is the layer's expert-parallel group."""
    r, d = knobs.adaptive_r, knobs.overlap_degree
    if r not in layout.valid_rs:
        raise ValueError(f"adaptive_r must be one of {layout.valid_rs}, got {r!r}")
    if not hasattr(experts, "stored_weights") and (r != 1 or layout.sharded_count != 1):
        raise ValueError("custom experts run only with adaptive_r=1 on whole experts (no sharding); "
                         f"got adaptive_r={r} with {layout.sharded_count} shard(s) per expert")
    prepare(layout, group)
    weights = gathered_weights(experts, layout, r, group)
    if routing.dropless:
        return _run_dropless(x_TD, routing, experts, weights, knobs, layout, group, is_postscore)
    return _run_capacity(x_TD, routing, experts, weights, knobs, layout, group, is_postscore)


def _output_dim(experts, x_TD: Tensor) -> int:
    """Output width of the experts. Custom experts need not map to model_dim and do not say:
    ask the module with zero rows (as the single-process layer does at capacity 0)."""
    out = getattr(experts, "output_dim", None)
    if out is not None:
        return out
    with torch.no_grad():
        y = experts(x_TD.new_zeros(getattr(experts, "num_local_experts", 1), 0, x_TD.shape[1]))
    return math.prod(y.shape[2:])


def _run_capacity(x_TD, routing, experts, weights, knobs, layout, group, is_postscore):
    E, W, s, r, d = layout.num_experts, layout.world_size, layout.sharded_count, knobs.adaptive_r, knobs.overlap_degree
    T, D = x_TD.shape
    K = routing.indices_TK.shape[1]
    (t_max,) = comm.agree_max([T], group=group, device=x_TD.device)
    C = capacity_for(knobs.capacity_factor, t_max, E, K)
    Cp = padded_capacity(C, s, d if r > 0 else 1)
    routing = with_capacity(routing, C, Cp)
    scale_TK, combine_TK = gate_scales(routing, is_postscore)
    if Cp == 0:   # every rank agrees: nothing to run, no communication
        return x_TD.new_zeros(T, _output_dim(experts, x_TD)) + x_TD.sum() * 0
    x_RD = dispatch_ops.dispatch(x_TD, routing.slots_TK, E * Cp, scale_TK)
    x_ECD = x_RD.view(E, Cp, D)
    if r == 0:
        y_ECO = _run_padded(experts, x_ECD, weights)
    else:
        y_ECO = _pipeline_capacity(x_ECD, experts, weights, layout, r, d, _exchange_for(knobs, layout, group))
    y_RO = y_ECO.reshape(E * Cp, y_ECO.shape[-1])
    return _combine(y_RO, routing, combine_TK)


def _pipeline_capacity(x_ECD: Tensor, experts, weights, layout: GroupLayout, r: int, d: int,
                       ex: comm.Exchange) -> Tensor:
    E, Cp, D = x_ECD.shape
    W, s = layout.world_size, layout.sharded_count
    e = layout.num_local_experts if s == 1 else 1
    Cc = Cp // d
    m = Cc if s == 1 else r * Cc // s        # rows of one (source, local expert) piece
    async_op = d > 1
    started = []
    for i in range(d):
        xc = x_ECD[:, i * Cc:(i + 1) * Cc]
        if r > 1:
            xc = xc.repeat(1, r, 1)            # [E, r*Cc, D]: r copies, split into s pieces below
        started.append(comm.exchange_start(xc.reshape(W, e, m, D), ex, async_op))
    returned = []
    for i in range(d):
        recv_WemD = comm.exchange_finish(started[i], ex)
        h_eXD = recv_WemD.transpose(0, 1).reshape(e, W * m, D)
        y_eXO = _run_padded(experts, h_eXD, weights)
        O = math.prod(y_eXO.shape[2:])            # custom experts may return [e, X, *out]
        back = y_eXO.reshape(e, W, m, O).transpose(0, 1)
        returned.append(comm.exchange_start(back, ex, async_op))
    outs = []
    for i in range(d):
        y_WemO = comm.exchange_finish(returned[i], ex)
        O = y_WemO.shape[-1]
        y = y_WemO.reshape(E, r, Cc, O)
        outs.append(y.sum(1) if r > 1 else y.reshape(E, Cc, O))
    return outs[0] if d == 1 else torch.cat(outs, dim=1)


# ----------------------------------------------------------------------------- dropless
def _split_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """Rows [lo, hi) of part ``index`` when n rows are split into ``parts`` near-equal parts."""
    base, extra = divmod(n, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def _ranges_index(starts: list[int], lengths: list[int], device) -> Tensor:
    """Concatenation of arange(start, start + length) for each pair, as one index tensor."""
    lens = torch.tensor(lengths, dtype=torch.int64)
    total = int(lens.sum()) if lengths else 0
    if total == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    st = torch.tensor(starts, dtype=torch.int64)
    offsets = torch.cumsum(lens, 0) - lens
    idx = torch.repeat_interleave(st - offsets, lens) + torch.arange(total)
    return idx.to(device)


def _send_plan(counts: list[int], layout: GroupLayout, r: int, d: int):
    """Per chunk: (row starts, row lengths, rows per (dest, local expert) [W][e]) in send order."""
    W, s, E = layout.world_size, layout.sharded_count, layout.num_experts
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    plans = []
    for i in range(d):
        starts, lengths, table = [], [], []
        for j in range(W):
            row = []
            if s == 1:
                e = layout.num_local_experts
                for le in range(e):
                    ex = j * e + le
                    lo, hi = _split_bounds(counts[ex], d, i)
                    starts.append(offsets[ex] + lo)
                    lengths.append(hi - lo)
                    row.append(hi - lo)
            else:
                ex, jj = divmod(j, s)
                g = s // r
                lo, hi = _split_bounds(counts[ex], d, i)
                plo, phi = _split_bounds(hi - lo, g, jj % g)
                starts.append(offsets[ex] + lo + plo)
                lengths.append(phi - plo)
                row.append(phi - plo)
            table.append(row)
        plans.append((starts, lengths, table))
    return plans


def _block_order(counts_AB: Tensor) -> Tensor:
    """Index that reorders rows stored as blocks [A][B] (sizes counts_AB) into [B][A] order."""
    A, B = counts_AB.shape
    flat = counts_AB.reshape(-1)
    starts = (torch.cumsum(flat, 0) - flat).view(A, B)
    return _ranges_index(starts.t().reshape(-1).tolist(), counts_AB.t().reshape(-1).tolist(), "cpu")


def _run_dropless(x_TD, routing, experts, weights, knobs, layout, group, is_postscore):
    E, W, s, r, d = layout.num_experts, layout.world_size, layout.sharded_count, knobs.adaptive_r, knobs.overlap_degree
    T, D = x_TD.shape
    device = x_TD.device
    scale_TK, combine_TK = gate_scales(routing, is_postscore)
    x_RD = dispatch_ops.dispatch(x_TD, routing.slots_TK, routing.num_rows, scale_TK)
    if r == 0:
        y_RO = _run_grouped(experts, x_RD, routing.counts_E, weights)
        return _combine(y_RO, routing, combine_TK)
    e = layout.num_local_experts if s == 1 else 1
    counts = routing.counts_E.tolist()                     # host sync: split sizes must be known
    plans = _send_plan(counts, layout, r, d)
    send_table = torch.tensor([p[2] for p in plans], dtype=torch.int64).permute(1, 0, 2)   # [W, d, e]
    recv_table = comm.exchange_counts(send_table.to(device), group=group).cpu()           # [W_src, d, e]
    identity = s == 1 and d == 1                            # expert-major rows are already in send order
    starts_all, lengths_all = [], []
    started, meta = [], []
    for i, (starts, lengths, table) in enumerate(plans):
        in_splits = [sum(row) for row in table]
        out_splits = recv_table[:, i, :].sum(1).tolist()
        ex = comm.FlatExchange(group, in_splits, out_splits)
        if identity:
            send = x_RD
        else:
            send = x_RD.index_select(0, _ranges_index(starts, lengths, device))
            starts_all += starts
            lengths_all += lengths
        started.append(comm.exchange_start(send, ex, d > 1))
        meta.append(ex)
    returned = []
    for i in range(d):
        recv = comm.exchange_finish(started[i], meta[i])
        counts_We = recv_table[:, i, :]
        if e > 1:
            order = _block_order(counts_We).to(device)
            h = recv.index_select(0, order)
        else:
            h = recv
        y = _run_grouped(experts, h, counts_We.sum(0).to(device), weights)
        if e > 1:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel(), device=device)
            y = y.index_select(0, inverse)
        returned.append(comm.exchange_start(y, meta[i].adjoint(), d > 1))
    ys = [comm.exchange_finish(returned[i], meta[i].adjoint()) for i in range(d)]
    if identity:
        y_RO = ys[0]
    else:
        y_sent = ys[0] if d == 1 else torch.cat(ys, 0)
        index = _ranges_index(starts_all, lengths_all, device)
        y_RO = y_sent.new_zeros(routing.num_rows, y_sent.shape[1]).index_add(0, index, y_sent)
    return _combine(y_RO, routing, combine_TK)
