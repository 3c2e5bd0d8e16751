"""Measurements the planner needs, taken by the runtime: link alpha-beta and device throughput.

The planner never imports torch; this module measures with torch and hands it plain numbers.
All ranks of a group must call ``probe_topology`` together (it runs collectives), and all of
them end with rank 0's samples, so every rank builds the same topology and cache key.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from planner import DeviceModel, Topology

# Up to 64 MiB per rank: NVLink moves 8 MiB in tens of microseconds, where launch and sync noise
# swamped the slope (2 x H200: bandwidth fitted 4x low, weight-gather plans predicted 2x slow).
PROBE_BYTES_GPU = (1 << 16, 1 << 20, 1 << 23, 1 << 26)
PROBE_BYTES_CPU = (1 << 12, 1 << 16, 1 << 18)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


def device_model_for(device: torch.device) -> DeviceModel:
    """A preset when the device is known (H100/H200, CPU), else a short measurement."""
    name = device_name(device)
    for preset in ("H200", "H100"):
        if preset in name:
            return DeviceModel.preset(preset)
    if device.type != "cuda":
        return DeviceModel.preset("cpu")
    return _measure_device(device)


def _measure_device(device: torch.device) -> DeviceModel:
    a = torch.randn(8, 2048, 2048, device=device, dtype=torch.bfloat16)
    buf = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    gemm_s = _time_cuda(lambda: torch.bmm(a, a), device)
    copy_s = _time_cuda(lambda: buf.clone(), device)
    memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    return DeviceModel.from_measurement(2 * 8 * 2048**3 / gemm_s / 1e12, 2 * buf.numel() / copy_s / 1e9,
                                        name=device_name(device), memory_gib=memory_gib)


def _time_cuda(fn, device: torch.device, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _time_collective(fn, device: torch.device, reps: int = 5) -> float:
    fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def probe_topology(group, world_size: int, local_size: int, device: torch.device) -> Topology:
    """All-to-all and all-gather over the group at a few sizes, fitted to alpha-beta per link."""
    if world_size == 1:
        return Topology.from_cluster(1, 1, intra_bw_gbps=1000.0, inter_bw_gbps=1000.0)
    sizes = PROBE_BYTES_GPU if device.type == "cuda" else PROBE_BYTES_CPU
    samples = []
    for nbytes in sizes:
        send = torch.empty(nbytes // 4 // world_size * world_size, dtype=torch.float32, device=device).normal_()
        recv = torch.empty_like(send)
        seconds = _time_collective(lambda: dist.all_to_all_single(recv, send, group=group), device)
        samples.append({"collective": "all_to_all", "group": "world", "bytes_per_rank": send.numel() * 4,
                        "seconds": seconds})
        shard = send[: send.numel() // world_size]
        gathered = torch.empty(shard.numel() * world_size, dtype=shard.dtype, device=device)
        seconds = _time_collective(lambda: dist.all_gather_into_tensor(gathered, shard, group=group), device)
        samples.append({"collective": "all_gather", "group": "world", "bytes_per_rank": gathered.numel() * 4,
                        "seconds": seconds})
    shared = [samples]
    dist.broadcast_object_list(shared, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return Topology.from_measurements(world_size, local_size, shared[0])
