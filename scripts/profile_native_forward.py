"""Profile (torch.profiler) of the one-call native forward: host time of the ATen calls inside it
and GPU time of every kernel it launches, per config and capacity mode.

    python scripts/profile_native_forward.py [config ...] [--balanced]   # default: fine64

--balanced: every expert gets exactly T*k/E tokens (bench_layer --routing balanced), so cf=1 and
dropless compute the same rows and their kernel tables compare one to one.
"""
from __future__ import annotations

import sys

import torch
from torch.profiler import ProfilerActivity, profile

from adaptmoe import native_forward
from adaptmoe.examples.bench_layer import CONFIGS, balance_routing, build_layer


def main() -> None:
    balanced = "--balanced" in sys.argv
    for name in [a for a in sys.argv[1:] if not a.startswith("--")] or ["fine64"]:
        cfg = CONFIGS[name]
        layer = build_layer(cfg, "cuda")
        x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
        if balanced:
            balance_routing(layer, x, cfg["K"])
        for mode, cf in (("cf=1", 1.0), ("dropless", 0.0)):
            knobs = layer.resolve_knobs(capacity_factor=cf)
            with torch.no_grad():
                x_TD, _ = layer.flatten_input(x)
                plan = native_forward.plan_for(layer, x_TD, knobs)
                for _ in range(5):
                    native_forward.run(layer, x_TD, knobs, plan)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(10):
                        native_forward.run(layer, x_TD, knobs, plan)
                        torch.cuda.synchronize()
            print(f"\n=== {name} {mode}: 10 calls ===")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
            print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=16, max_name_column_width=60))


if __name__ == "__main__":
    main()
