"""Timeline of one isolated forward (no_grad) of bench_layer's configs: when the host launched each
kernel and when the GPU ran it, relative to the call's start. Shows where the GPU waits for the host.

    python scripts/timeline_forward.py [config ...]      # default: fine64 readme_bf16 dsv3
"""
from __future__ import annotations

import json
import os
import sys
import tempfile

import torch

from adaptmoe.examples.bench_layer import CONFIGS, build_layer


def timeline(name: str) -> None:
    cfg = CONFIGS[name]
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
    with torch.no_grad():
        for _ in range(5):
            layer(x)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                torch.cuda.synchronize()
                with torch.profiler.record_function("CALL"):
                    layer(x)
                torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    events = json.load(open(path))["traceEvents"]
    calls = sorted((e for e in events if e.get("name") == "CALL" and e.get("ph") == "X"), key=lambda e: e["ts"])
    call = calls[-1]
    t0, t1 = call["ts"], call["ts"] + call["dur"]
    launches = {e["args"].get("correlation"): e for e in events if e.get("cat") == "cuda_runtime"
                and e.get("ph") == "X" and t0 <= e["ts"] <= t1}
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
                      and e.get("ph") == "X" and e["args"].get("correlation") in launches), key=lambda e: e["ts"])
    print(f"\n=== {name}: host call {call['dur']:.0f} us; kernels {len(kernels)}")
    print(f"{'launch@':>8} {'start@':>8} {'dur':>7} {'gap':>6}  kernel")
    prev_end = None
    busy = 0.0
    for k in kernels:
        launch = launches[k["args"]["correlation"]]["ts"] - t0
        gap = 0.0 if prev_end is None else k["ts"] - prev_end
        print(f"{launch:8.0f} {k['ts'] - t0:8.0f} {k['dur']:7.0f} {gap:6.0f}  {k['name'][:70]}")
        prev_end = k["ts"] + k["dur"]
        busy += k["dur"]
    if kernels:
        span = kernels[-1]["ts"] + kernels[-1]["dur"] - t0
        print(f"GPU busy {busy:.0f} us of {span:.0f} us from the call's start (first kernel at "
              f"{kernels[0]['ts'] - t0:.0f} us)")
    ops = sorted((e for e in events if e.get("cat") == "cpu_op" and e.get("ph") == "X" and t0 <= e["ts"] <= t1),
                 key=lambda e: e["ts"])
    top = [e for e in ops if not any(o is not e and o["ts"] <= e["ts"] and e["ts"] + e["dur"] <= o["ts"] + o["dur"]
                                     and o["name"] != "CALL" for o in ops)]
    print("top-level host ops: " + ", ".join(f"{e['name']}@{e['ts'] - t0:.0f}+{e['dur']:.0f}" for e in top
                                              if e["name"] != "CALL"))


if __name__ == "__main__":
    for config in sys.argv[1:] or ["fine64", "readme_bf16", "dsv3"]:
        timeline(config)
