"""fine64 forward (no_grad): layer path vs the fused path of bench_layer. Reports host syncs
(torch.cuda sync debug mode), GPU kernel time per call (profiler) and wall time per call.

    python scripts/profile_layer_vs_fused.py
"""
from __future__ import annotations

import time
import warnings

import torch

from adaptmoe.examples.bench_layer import build_layer, fused_forward

from adaptmoe.examples.bench_layer import CONFIGS  # noqa: E402

CFG = CONFIGS["fine64"]


def main() -> None:
    layer = build_layer(CFG, "cuda")
    x = torch.randn(CFG["T"], CFG["D"], device="cuda", dtype=torch.bfloat16)
    paths = {"layer": lambda: layer(x), "fused": lambda: fused_forward(layer, x, CFG["K"], 1.0)}
    print("training mode:", layer.training)
    with torch.no_grad():
        for name, fn in paths.items():
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
            torch.cuda.set_sync_debug_mode("default")
            print(f"[{name}] syncs: {[str(w.message)[:120] for w in caught]}")
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                fn()
            torch.cuda.synchronize()
            print(f"[{name}] wall ms/call {(time.perf_counter() - t0) / 50 * 1e3:.3f}")
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            events = prof.key_averages()
            gpu_us = sum(e.self_device_time_total for e in events) / 10
            print(f"[{name}] GPU kernel time per call {gpu_us / 1e3:.3f} ms")
            print(events.table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))


if __name__ == "__main__":
    main()
