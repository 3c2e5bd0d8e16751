"""Where a tiny multi-rank training call spends its time (it bounds every small call's cost).

    torchrun --standalone --nproc_per_node 2 scripts/profile_dist_call.py

Prints, on rank 0, per knob set (adaptive_r, overlap degree): ms of the forward alone and of
forward + backward (median of 20, each ended by a device sync), then cProfile's top functions and
the torch profiler's CPU-time table of one fwd+bwd at the default knobs.
"""
from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import time

import torch
import torch.distributed as dist

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer


def median_ms(fn, n: int = 20) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def main() -> None:
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank = dist.get_rank()
    cfg = MoEConfig(model_dim=64, num_experts=8, gate=GateConfig(top_k=2, capacity_factor=1.0),
                    experts=ExpertConfig(hidden_size=128))
    layer = MoELayer(cfg).cuda().to(torch.bfloat16)
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    for knobs in ({"adaptive_r": 0}, {"adaptive_r": 1}, {"adaptive_r": 1, "a2a_ffn_overlap_degree": 2}):
        def fwd(knobs=knobs):
            with torch.no_grad():
                layer(x, **knobs)

        def step(knobs=knobs):
            layer(x, **knobs).float().sum().backward()
        f, s = median_ms(fwd), median_ms(step)
        if rank == 0:
            print(f"{knobs}: forward {f:.3f} ms, forward+backward {s:.3f} ms", flush=True)
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(20):
        layer(x, adaptive_r=1).float().sum().backward()
    torch.cuda.synchronize()
    profile.disable()
    if rank == 0:
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    from torch.profiler import ProfilerActivity, profile as tprofile
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            layer(x, adaptive_r=1).float().sum().backward()
        torch.cuda.synchronize()
    if rank == 0:
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=50))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
