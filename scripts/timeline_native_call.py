"""GPU/host timeline of isolated no-grad layer calls (torch.profiler trace): when each kernel starts
on the GPU and when the host launched it, in us from the call's start, for the last of N calls.

    python scripts/timeline_native_call.py [config ...] [--python] [--host]   # default: fine64 readme_bf16

--host also lists the host's ATen ops and CUDA API calls of the last call (>= 1 us each).

A kernel whose GPU start trails its launch by ~the launch latency was waiting for the host; the
gaps between kernels on the GPU are the bubbles an isolated call pays.
"""
from __future__ import annotations

import json
import sys
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from adaptmoe import native_forward
from adaptmoe.examples.bench_layer import CONFIGS, build_layer


def timeline(name: str, cf: float, calls: int = 6) -> None:
    cfg = CONFIGS[name]
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
    with torch.no_grad():
        for _ in range(5):
            layer(x, capacity_factor=cf)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(calls):
                with record_function(f"call{i}"):
                    layer(x, capacity_factor=cf)
                torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.load(open(f.name))["traceEvents"]
    last = f"call{calls - 1}"
    call = next(e for e in events if e.get("name") == last and e.get("ph") == "X")
    t0, t1 = call["ts"], call["ts"] + call["dur"]
    launches = {e["args"].get("correlation"): e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and t0 <= e["ts"] <= t1 and "args" in e}
    kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")
                      and e.get("args", {}).get("correlation") in launches), key=lambda e: e["ts"])
    print(f"\n=== {name} cf={cf} ({'native' if native_forward._enabled else 'python'}): host call {call['dur']:.0f} us")
    prev_end = None
    for k in kernels:
        launch = launches[k["args"]["correlation"]]
        gap = "" if prev_end is None else f"gap {k['ts'] - prev_end:6.1f}"
        print(f"  launch {launch['ts'] - t0:7.1f}  gpu {k['ts'] - t0:7.1f} +{k['dur']:7.1f}  {gap:>10}  {k['name'][:70]}")
        prev_end = k["ts"] + k["dur"]
    if "--host" in sys.argv:   # what the host did in the call: ATen ops and CUDA API calls of >= 1 us
        print("  host events (start us from the call, duration us):")
        kinds = ("cpu_op", "cuda_runtime", "cuda_driver")
        host = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in kinds
                       and t0 <= e["ts"] <= t1 and e.get("dur", 0) >= 1.0), key=lambda e: e["ts"])
        for e in host:
            print(f"    {e['ts'] - t0:7.1f} +{e['dur']:6.1f}  {e['cat']:<12} {e['name'][:80]}")


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    native_forward.set_enabled("--python" not in sys.argv)
    for name in args or ["fine64", "readme_bf16"]:
        for cf in (1.0, 0.0):
            timeline(name, cf)


if __name__ == "__main__":
    main()
