"""Host cost of one layer forward on the GPU (no_grad, eager): wall time per call with the GPU
kept busy back to back (host-bound when host time >= GPU time), where the Python time goes
(cProfile), and which torch ops one call issues (profiler, CPU side).

    python scripts/profile_host.py [--config readme_bf16|fine64|tiny] [--cf 1.0]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from adaptmoe.examples.bench_layer import CONFIGS, build_layer

TINY = dict(T=64, D=64, H=64, E=64, K=8, dtype="bf16")


def wall_us(layer, x: torch.Tensor, cf: float, n: int = 200) -> tuple[float, float]:
    """(host us per call without waiting on the GPU, us per call with the GPU included)."""
    with torch.no_grad():
        for _ in range(20):
            layer(x, capacity_factor=cf)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            layer(x, capacity_factor=cf)
        host = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) / n * 1e6
    return host, total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="readme_bf16", choices=[*CONFIGS, "tiny"])
    ap.add_argument("--cf", type=float, default=1.0)
    args = ap.parse_args()
    cfg = TINY if args.config == "tiny" else CONFIGS[args.config]
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
    print(f"{args.config} cf={args.cf}: host us/call %.1f, with GPU %.1f" % wall_us(layer, x, args.cf))
    profile = cProfile.Profile()
    with torch.no_grad():
        profile.enable()
        for _ in range(100):
            layer(x, capacity_factor=args.cf)
        profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(35)
    from torch.profiler import ProfilerActivity, profile as tprofile
    with torch.no_grad(), tprofile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            layer(x, capacity_factor=args.cf)
    print(prof.key_averages().table(sort_by="count", row_limit=40, max_name_column_width=50))


if __name__ == "__main__":
    main()
