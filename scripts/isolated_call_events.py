"""Where an isolated eager forward (no_grad) spends its time, without a profiler: CUDA events and
host timestamps at the layer's stage boundaries (gate, routing, dispatch, experts, combine, end),
medians over calls each started on an idle GPU. A stage whose GPU time tracks its host time is
waiting for the host.

    python scripts/isolated_call_events.py [config ...] [--cprofile] [--stamps]   # default: fine64 readme_bf16
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch

from adaptmoe import dispatch as dispatch_ops
from adaptmoe import executor
from adaptmoe import layer as layer_module
from adaptmoe.examples.bench_layer import CONFIGS, build_layer

STAGES = ["gate", "route", "dispatch", "experts", "combine", "end"]


class Marks:
    def __init__(self):
        self.events, self.host = {}, {}

    def mark(self, name: str) -> None:
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        self.events[name] = ev
        self.host[name] = time.perf_counter()


def wrap(owner, attr: str, stage: str, marks: list):
    inner = getattr(owner, attr)

    def wrapped(*args, **kwargs):
        out = inner(*args, **kwargs)
        if marks:
            marks[0].mark(stage)
        return out
    setattr(owner, attr, wrapped)


def run(name: str, calls: int = 30) -> None:
    cfg = CONFIGS[name]
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
    current: list[Marks] = []
    layer.gates[0].register_forward_hook(lambda *a: current[0].mark("gate") if current else None)
    wrap(layer_module, "fused_routing", "route", current)   # the name layer.py calls
    wrap(dispatch_ops, "dispatch", "dispatch", current)
    wrap(executor, "run_experts_local", "experts", current)
    wrap(dispatch_ops, "combine", "combine", current)
    gpu = {s: [] for s in STAGES}
    host = {s: [] for s in STAGES}
    with torch.no_grad():
        for i in range(calls + 5):
            torch.cuda.synchronize()
            m = Marks()
            current[:] = [m]
            m.mark("start")
            layer(x)
            m.mark("end")
            torch.cuda.synchronize()
            current.clear()
            if i < 5:
                continue
            for s in STAGES:
                gpu[s].append(m.events["start"].elapsed_time(m.events[s]) * 1e3)
                host[s].append((m.host[s] - m.host["start"]) * 1e6)
    print(f"=== {name}: stage boundary, host enqueue time and GPU reach time (us from the call's start, medians)")
    for s in STAGES:
        print(f"  {s:<9} host {statistics.median(host[s]):8.1f}   gpu {statistics.median(gpu[s]):8.1f}")


def cprofile_isolated(name: str, calls: int = 30) -> None:
    """Python-level host time of isolated calls (each after a synchronize), by function."""
    import cProfile
    import pstats
    cfg = CONFIGS[name]
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
    prof = cProfile.Profile()
    with torch.no_grad():
        for i in range(calls + 5):
            torch.cuda.synchronize()
            if i >= 5:
                prof.enable()
            layer(x)
            prof.disable()
        torch.cuda.synchronize()
    print(f"=== {name}: cProfile of {calls} isolated calls")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


def main() -> None:
    args = sys.argv[1:]
    profile = "--cprofile" in args
    names = [a for a in args if not a.startswith("--")] or ["fine64", "readme_bf16"]
    for name in names:
        run(name)
        if profile:
            cprofile_isolated(name)
        if "--stamps" in args:
            host_stamps(name)



@contextlib.contextmanager
def stamped_calls(targets, marks: list[tuple[str, float]]):
    """Within the block, each (owner, attribute, label) in ``targets`` appends (label + ">", t) to
    ``marks`` on entry and (label + "<", t) on exit, t = perf_counter (no CUDA events: ~0.1 us per
    stamp); the originals are put back after."""
    originals = []

    def stamped(inner, label):
        def wrapped(*args, **kwargs):
            marks.append((label + ">", time.perf_counter()))
            out = inner(*args, **kwargs)
            marks.append((label + "<", time.perf_counter()))
            return out
        return wrapped

    try:
        for owner, attr, label in targets:
            inner = getattr(owner, attr)
            originals.append((owner, attr, inner))
            setattr(owner, attr, stamped(inner, label))
        yield marks
    finally:
        for owner, attr, inner in reversed(originals):
            setattr(owner, attr, inner)


def host_stamps(name: str, calls: int = 40) -> None:
    """Host-only timeline of isolated calls: perf_counter at the entry (>) and exit (<) of each
    stage function."""
    import adaptmoe.ops as ops_module
    from adaptmoe.layer import MoELayer
    cfg = CONFIGS[name]
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
    stamps: list[tuple[str, float]] = []
    targets = [(MoELayer, "_resolved_call", "knobs"), (MoELayer, "_tokens_of", "flatten"),
               (MoELayer, "_route", "route"), (layer_module, "add_noise", "noise"),
               (layer_module, "fused_routing", "fused_routing"), (ops_module, "route_topk", "topk_op"),
               (MoELayer, "_run", "run"), (dispatch_ops, "dispatch", "dispatch"),
               (executor, "run_experts_local", "experts"), (dispatch_ops, "combine", "combine"),
               (MoELayer, "_losses", "losses")]
    layer.gates[0].register_forward_pre_hook(lambda *a: stamps.append(("gate>", time.perf_counter())))
    layer.gates[0].register_forward_hook(lambda *a: stamps.append(("gate<", time.perf_counter())))
    runs: dict[str, list[float]] = {}
    with torch.no_grad(), stamped_calls(targets, stamps):
        for i in range(calls + 5):
            torch.cuda.synchronize()
            stamps.clear()
            t0 = time.perf_counter()
            layer(x)
            stamps.append(("return", time.perf_counter()))
            if i >= 5:
                for label, t in stamps:
                    runs.setdefault(label, []).append((t - t0) * 1e6)
    print(f"=== {name}: host stamps of isolated calls (us from the call, medians)")
    order = sorted(runs, key=lambda k: statistics.median(runs[k]))
    for label in order:
        print(f"  {label:<16} {statistics.median(runs[label]):8.1f}")


if __name__ == "__main__":
    main()
