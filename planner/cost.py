"""Cost of one MoE layer call under one Plan, and the reasons a Plan cannot run.

One call = gate/routing -> dispatch -> [all-to-all -> experts (+ weight gathers) -> all-to-all]
-> combine. The bracketed part runs as Tutel's pipeline of d chunks: one communication stream
sends every chunk's dispatch then every chunk's combine; chunk i's experts start once its dispatch
landed. Training = forward + backward: compute and memory passes x3, all-to-all x2 (backward
runs the same pipeline), each weight gather adds a reduce-scatter of its gradients.

Times are in seconds inside, milliseconds in what `estimate` returns.
"""
from __future__ import annotations

from planner.device import DeviceModel
from planner.plan import LayerSignature, Plan
from planner.shapes import (CallShape, call_shape, capacity_slots, peak_memory_bytes,
                            shards_per_expert, valid_adaptive_rs)
from planner.topology import Topology

DECODE_MAX_TOKENS = 64      # beyond this every expert is selected anyway: decode = grouped
BACKWARD_COMPUTE = 2.0      # backward GEMMs: grad of input and grad of weight
GIB = 1024 ** 3


# -- feasibility ------------------------------------------------------------------------------
def _layout_reasons(signature: LayerSignature, topology: Topology) -> list[str]:
    E, W = signature.num_experts, topology.world_size
    if E >= W and E % W:
        return [f"num_experts {E} must be divisible by the world size {W}"]
    if E < W and W % E:
        return [f"world size {W} must be divisible by num_experts {E} to shard experts"]
    shards = shards_per_expert(E, W)
    if signature.hidden % shards:
        return [f"hidden {signature.hidden} must be divisible by {shards} shards per expert"]
    return []


def _parallel_reasons(plan: Plan, shards: int, topology: Topology) -> list[str]:
    r, d, W = plan.adaptive_r, plan.overlap_degree, topology.world_size
    reasons = []
    if r > 0 and shards % r:
        reasons.append(f"adaptive_r={r} needs the {shards} shard(s) of each expert divisible by "
                       f"{r} (valid: {valid_adaptive_rs(shards)})")
    if d > 1 and W == 1:
        reasons.append(f"overlap_degree={d} needs more than one rank (world size 1)")
    elif d > 1 and r == 0:
        reasons.append(f"overlap_degree={d} has no all-to-all to overlap with adaptive_r=0")
    if plan.a2a_algo == "2d":
        if r == 0:
            reasons.append("2d all-to-all has no all-to-all to run with adaptive_r=0")
        elif topology.num_nodes == 1:
            reasons.append(f"2d all-to-all needs more than one node (1 node of "
                           f"{topology.local_size} GPUs)")
        elif topology.local_size == 1:
            reasons.append(f"2d all-to-all needs more than one GPU per node "
                           f"({topology.num_nodes} nodes of 1 GPU)")
    return reasons


def _kernel_reasons(plan: Plan, signature: LayerSignature, tokens_per_rank: int) -> list[str]:
    kernel, cf = plan.expert_kernel, signature.capacity_factor
    reasons = []
    if kernel == "bmm" and cf <= 0:
        reasons.append(f"bmm needs a fixed capacity (capacity_factor > 0), got {cf:g}")
    if kernel != "bmm" and signature.expert_type == "custom":
        reasons.append(f"{kernel} kernel needs a built-in expert (ffn or gated_ffn), got custom")
    if kernel == "decode" and signature.training:
        reasons.append("decode kernel is inference-only (training=True)")
    if kernel == "decode" and tokens_per_rank > DECODE_MAX_TOKENS:
        reasons.append(f"decode kernel needs tokens_per_rank <= {DECODE_MAX_TOKENS}, "
                       f"got {tokens_per_rank}")
    capacity = capacity_slots(signature, tokens_per_rank)
    slots = capacity if kernel == "bmm" else tokens_per_rank * signature.top_k
    if plan.overlap_degree > 1 and slots is not None and slots < plan.overlap_degree:
        reasons.append(f"overlap_degree={plan.overlap_degree} splits {slots} slot(s) per expert "
                       f"into fewer than one row per chunk")
    return reasons


def _memory_reasons(shape: CallShape, signature: LayerSignature, device: DeviceModel
                    ) -> list[str]:
    weights, activations = peak_memory_bytes(shape, signature)
    limit = device.memory_gib * GIB
    if weights > limit:
        return [f"expert weights {weights / GIB:.1f} GiB exceed device memory "
                f"{device.memory_gib:g} GiB"]
    if weights + activations > limit:
        return [f"expert weights and activations {(weights + activations) / GIB:.1f} GiB exceed "
                f"device memory {device.memory_gib:g} GiB"]
    return []


def structural_reasons(plan: Plan, signature: LayerSignature, tokens_per_rank: int,
                       topology: Topology) -> list[str]:
    """Reasons the plan is undefined here (divisibility, algorithm, kernel); memory aside."""
    if tokens_per_rank < 0:
        return [f"tokens_per_rank must be >= 0, got {tokens_per_rank}"]
    reasons = _layout_reasons(signature, topology)
    if reasons:
        return reasons
    shards = shards_per_expert(signature.num_experts, topology.world_size)
    return (_parallel_reasons(plan, shards, topology)
            + _kernel_reasons(plan, signature, tokens_per_rank))


def feasibility(plan: Plan, signature: LayerSignature, tokens_per_rank: int,
                topology: Topology, device: DeviceModel) -> list[str]:
    """Every reason this plan cannot run; empty when it can."""
    reasons = structural_reasons(plan, signature, tokens_per_rank, topology)
    if reasons:      # sizes (and so memory) are only defined once the layout is valid
        return reasons
    shape = call_shape(plan, signature, tokens_per_rank, topology.world_size)
    return _memory_reasons(shape, signature, device)


# -- timing pieces (seconds) ------------------------------------------------------------------
def _launches(device: DeviceModel, kernels: float) -> float:
    return kernels * device.launch_us * 1e-6


def gate_seconds(signature: LayerSignature, tokens: int, device: DeviceModel) -> float:
    """Gate matmul, softmax, top-k, slot cumsum: reads x_TD once and scores_TE a few times."""
    D, E = signature.model_dim, signature.num_experts
    bytes_moved = tokens * D * signature.dtype_bytes + 4 * tokens * E * 4
    flops = 2.0 * tokens * D * E
    gemm = device.expert_gemm_seconds(flops, tokens, "bmm")
    return max(device.memory_seconds(bytes_moved), gemm) + _launches(device, 6)


def dispatch_seconds(shape: CallShape, signature: LayerSignature, tokens: int,
                     device: DeviceModel) -> float:
    """Encode: read each token once per selection, write the (padded, replicated) send buffer."""
    row_bytes = signature.model_dim * signature.dtype_bytes
    written = shape.sent_rows * shape.replication
    bytes_moved = (tokens * signature.top_k + written) * row_bytes
    return device.memory_seconds(bytes_moved) + _launches(device, 1 + (shape.replication > 1))


def combine_seconds(shape: CallShape, signature: LayerSignature, tokens: int,
                    device: DeviceModel) -> float:
    """Decode: read the returned rows (all R copies), write the weighted sum y_TD."""
    row_bytes = signature.model_dim * signature.dtype_bytes
    bytes_moved = (shape.sent_rows * shape.replication + tokens) * row_bytes
    return device.memory_seconds(bytes_moved) + _launches(device, 1 + (shape.replication > 1))


def sync_seconds(plan: Plan, signature: LayerSignature, topology: Topology,
                 device: DeviceModel) -> float:
    """Row counts exchanged (and read by the host) before a variable-size all-to-all."""
    if plan.expert_kernel == "bmm" or plan.adaptive_r == 0 or topology.world_size == 1:
        return 0.0
    counts_bytes = 8 * signature.num_experts
    return topology.collective_time("all_to_all", counts_bytes, "world") + _launches(device, 2)


def a2a_seconds(plan: Plan, bytes_per_rank: float, topology: Topology,
                device: DeviceModel) -> float:
    """One all-to-all of `bytes_per_rank` with the plan's algorithm."""
    call = device.collective_call_us * 1e-6
    if plan.a2a_algo == "flat":
        return topology.collective_time("all_to_all", bytes_per_rank, "world") + call
    # 2D: intra-node exchange, then inter-node exchange of L-times larger messages, with a
    # stride-copy layout transform (read + write) before each stage.
    layout = 2 * (device.memory_seconds(2 * bytes_per_rank) + _launches(device, 1))
    return (topology.collective_time("all_to_all", bytes_per_rank, "intra")
            + topology.collective_time("all_to_all", bytes_per_rank, "inter") + layout + call)


def expert_seconds(plan: Plan, shape: CallShape, signature: LayerSignature,
                   device: DeviceModel) -> float:
    """Forward expert kernels for one chunk of d: the slower of GEMM throughput and weight reads."""
    d = plan.overlap_degree
    if shape.compute_rows == 0:
        return 0.0
    flops = shape.flops / d
    elementwise = 2 * (shape.compute_rows / d) * shape.hidden_compute * signature.dtype_bytes
    if plan.expert_kernel == "decode":     # GEMV-style: streams the selected experts' weights
        gemm = flops / (device.gemm_tflops * 1e12 * device.expert_fraction)
        weights = device.memory_seconds(shape.weight_read_bytes)
    else:
        gemm = device.expert_gemm_seconds(flops, shape.rows_per_matrix / d, plan.expert_kernel)
        weights = device.memory_seconds(shape.weight_read_bytes) / device.gemm_stream_fraction
    # Separate kernels, not hidden under the GEMMs: the activation pass and, with d > 1, each
    # chunk's permute into expert-major order and back (read + write twice).
    permutes = 4 * shape.a2a_bytes / d if d > 1 else 0
    passes = device.memory_seconds(elementwise + permutes)
    kernels = signature.matrices_per_expert + 1 + (2 if d > 1 else 0)
    return max(gemm, weights) + passes + _launches(device, kernels)


def chunk_seconds(plan: Plan, signature: LayerSignature, device: DeviceModel) -> float:
    """Fixed cost of the overlap chunks beyond the first, in series with the call: each adds its
    own all-to-all calls, permutes and launches (measured by the runtime on a tiny call)."""
    per_chunk_us = device.train_chunk_overhead_us if signature.training else device.chunk_overhead_us
    return (plan.overlap_degree - 1) * per_chunk_us * 1e-6


def gather_seconds(plan: Plan, shape: CallShape, topology: Topology, collective: str) -> float:
    """One transient weight all-gather (forward) or its gradient reduce-scatter (backward)."""
    if shape.gather_bytes == 0:
        return 0.0
    group = "world" if plan.adaptive_r == 0 else shape.gather_group
    return topology.collective_time(collective, shape.gather_bytes, group)


def pipeline_seconds(dispatch_s: float, compute_s: float, combine_s: float, chunks: int) -> float:
    """Makespan of Tutel's overlap timeline for `chunks` equal chunks.

    The communication stream runs dispatch 0..d-1 then combine 0..d-1 in order; compute chunk i
    starts after dispatch i and compute i-1; combine i after compute i and the previous send.
    With one chunk this is dispatch + compute + combine.
    """
    comm_free, compute_free, compute_end = 0.0, 0.0, []
    for _ in range(chunks):
        comm_free += dispatch_s
        compute_free = max(compute_free, comm_free) + compute_s
        compute_end.append(compute_free)
    for end in compute_end:
        comm_free = max(comm_free, end) + combine_s
    return comm_free


def _pipelined_parts(plan: Plan, shape: CallShape, signature: LayerSignature,
                     topology: Topology, device: DeviceModel) -> dict[str, float]:
    """Seconds of the pipelined middle: raw per-component totals and the pipeline makespan.

    Weight gathers run inside each chunk's expert call (d times; R=0 has d=1), on the compute
    stream, so they delay that chunk's compute rather than overlap with it.
    """
    d = plan.overlap_degree
    a2a = a2a_seconds(plan, shape.a2a_bytes / d, topology, device) if shape.a2a_bytes else 0.0
    contention = 1.0 + (device.overlap_contention if d > 1 else 0.0)
    experts = expert_seconds(plan, shape, signature, device) * contention
    gather = gather_seconds(plan, shape, topology, "all_gather")
    parts = {"a2a": 2 * d * a2a, "experts": d * experts, "weight_gather": d * gather,
             "makespan": pipeline_seconds(a2a, experts + gather, a2a, d)}
    if signature.training:
        scatter = gather_seconds(plan, shape, topology, "reduce_scatter")
        parts["a2a"] *= 2
        parts["experts"] *= 1 + BACKWARD_COMPUTE
        parts["weight_gather"] += d * scatter
        parts["makespan"] += pipeline_seconds(a2a, BACKWARD_COMPUTE * experts + scatter, a2a, d)
    return parts


def estimate(plan: Plan, signature: LayerSignature, tokens_per_rank: int,
             topology: Topology, device: DeviceModel) -> tuple[float, dict[str, float]]:
    """(predicted ms, breakdown in ms) of one call: forward, or forward+backward when training.

    The breakdown sums to the total: gate + dispatch + combine + sync + a2a + experts +
    weight_gather + chunks (the measured fixed cost of each overlap chunk beyond the first)
    - overlap_hidden (the communication the pipeline hid behind compute) + host
    (the part of the measured host-side cost of a call that the device work does not cover: the
    host enqueues work while the device runs, so a call takes the longer of the two, plus, in one
    process, the share ``host_exposed_fraction`` of the shorter that does not overlap).
    Raises ValueError for a plan whose layout is invalid (see `feasibility`).
    """
    structural = structural_reasons(plan, signature, tokens_per_rank, topology)
    if structural:
        raise ValueError(f"cannot cost {plan.label()}: " + "; ".join(structural))
    shape = call_shape(plan, signature, tokens_per_rank, topology.world_size)
    passes = 1.0 + (BACKWARD_COMPUTE if signature.training else 0.0)
    seconds = {
        "gate": passes * gate_seconds(signature, tokens_per_rank, device),
        "dispatch": passes * dispatch_seconds(shape, signature, tokens_per_rank, device),
        "combine": passes * combine_seconds(shape, signature, tokens_per_rank, device),
        "sync": sync_seconds(plan, signature, topology, device),
        "chunks": chunk_seconds(plan, signature, device),
    }
    middle = _pipelined_parts(plan, shape, signature, topology, device)
    seconds.update(a2a=middle["a2a"], experts=middle["experts"],
                   weight_gather=middle["weight_gather"])
    raw_middle = middle["a2a"] + middle["experts"] + middle["weight_gather"]
    seconds["overlap_hidden"] = max(raw_middle - middle["makespan"], 0.0)
    # Chunk costs run in series with the call (collective calls wait on each other), so the host
    # time is compared with the rest of the device work only.
    device_s = sum(v for k, v in seconds.items() if k not in ("overlap_hidden", "chunks")) - seconds["overlap_hidden"]
    host_s = 1e-6 * (device.train_call_overhead_us if signature.training else device.call_overhead_us)
    # One process: the host's Python between kernels is partly exposed even when the device work is
    # longer (1 x H100 sweep). With collectives in the call their waits absorb it (2 x H200 sweep).
    exposed = device.host_exposed_fraction * min(host_s, device_s) if topology.world_size == 1 else 0.0
    seconds["host"] = max(host_s - device_s, 0.0) + exposed
    return (device_s + seconds["chunks"] + seconds["host"]) * 1e3, {k: v * 1e3 for k, v in seconds.items()}
