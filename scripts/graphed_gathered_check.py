"""Graphed dropless fine-grained forward with the gathered GEMM launched by Triton's launcher vs
from the native call (each captured in its own graph), interleaved replays on an idle GPU;
--after-eager first runs bench_layer's eager rows (no-grad calls, then training steps) as
bench_layer does before its graphed rows, and reports which native gathered calls were served.

    python scripts/graphed_gathered_check.py [config] [--iters N] [--after-eager]
"""
from __future__ import annotations

import statistics
import sys

import torch

from adaptmoe import native_forward
from adaptmoe.examples import bench_layer
from adaptmoe.examples.bench_layer import CONFIGS, balance_routing, build_layer
from adaptmoe.examples.timing import capture_no_grad
from adaptmoe.ops import _native, _triton_gemm


def replay_ms(graph) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def main() -> None:
    name = next((a for a in sys.argv[1:] if not a.startswith("--")), "fine64")
    iters = int(sys.argv[sys.argv.index("--iters") + 1]) if "--iters" in sys.argv else 50
    cfg = CONFIGS[name]
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
    balance_routing(layer, x, cfg["K"])
    native = _native.load()
    served, real = [], native.moe_forward_nograd_gathered

    def spy(*args):
        out = real(*args)
        served.append(bool(out))
        return out
    native.moe_forward_nograd_gathered = spy
    if "--after-eager" in sys.argv:
        for cf in (1.0, 0.0):
            row = bench_layer._eager_row(name, "x", "layer", layer, x, cf, cfg["K"], 20, 5, 0, False)
            print(f"  eager cf={cf}: fwd {row.fwd_ms:.3f} ms, f+b {row.fwdbwd_ms:.3f} ms")
        print(f"  served during eager rows: {served.count(True)} of {len(served)}; variants "
              f"{_triton_gemm._grouped_rows_launches._variants}")
        served.clear()
    graphs = {}
    for label, from_native in (("triton launcher", False), ("native launch", True), ("cf=1", True)):
        native_forward.set_triton_from_native(from_native)
        cf = 1.0 if label == "cf=1" else 0.0
        graphs[label], _ = capture_no_grad(lambda: layer(x, capacity_factor=cf), warmup=3)
    native_forward.set_triton_from_native(True)
    print(f"  native gathered calls during the captures (3 warmups + capture each): {served}")
    times = {label: [] for label in graphs}
    for i in range(iters):
        for label in list(graphs)[i % len(graphs):] + list(graphs)[:i % len(graphs)]:
            times[label].append(replay_ms(graphs[label]))
    print(f"{name} balanced, graphed forward, median of {iters} interleaved replays:")
    for label, ms in times.items():
        print(f"  {label:<16} {statistics.median(ms):.3f} ms")


if __name__ == "__main__":
    main()
