"""Interleaved A/B of the no-grad forward: one native call (adaptmoe.native_forward) vs the Python
path vs a CUDA-graph replay, per bench_layer config and capacity mode; where they apply, the
native call without the short way of repeat calls (no_repeat: every call through the knob checks,
flattening and plan lookup), without the dense layout of k == E calls (no_dense), without the
gathered first GEMM (no_gather, and graphed_no_gather its graph), with that GEMM launched from
Python between two native calls instead of from inside the one native call (triton_py), with
the gathered GEMM at any size (gather_all: native_forward._GATHER_MIN_ELEMENTS = 0), and dropless
calls in grouped rows instead of cf=1's capacity slots (no_slots, graphed_no_slots: torch's
grouped second GEMM), and gates of few experts through at::mm instead of the gate kernel fused
with the top-k (no_gate_kernel, graphed_no_gate_kernel).

    python scripts/ab_native_forward.py [config ...] [--iters N] [--routing random|balanced] [--tokens T]
                                        [--modes cf=1,dropless]

Each iteration times the three variants back to back, in a rotating order, each call started on
an idle GPU (CUDA events around it, then a sync): clock drift and heat (bench_layer measures its
paths one after another, and later rows ran up to 10% slower on Mixtral) hit all three alike.
Also prints the host time of one call (perf_counter from the call to its return, no sync).
Medians over --iters; ratios over the expert-compute floor timed the same way.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from adaptmoe import native_forward, ops
from adaptmoe.examples.bench_layer import CONFIGS, DTYPES, balance_routing, build_layer
from adaptmoe.examples.timing import capture_no_grad

SPIN = False   # --spin: poll the end event instead of blocking on it
GATHER_MIN = native_forward._GATHER_MIN_ELEMENTS


def timed(fn) -> tuple[float, float]:
    """(GPU ms from start event to end event, host us until fn returned) of one isolated call."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    fn()
    host_us = (time.perf_counter() - t0) * 1e6
    end.record()
    if SPIN:
        while not end.query():
            pass
    else:
        end.synchronize()
    return start.elapsed_time(end), host_us


def variants(layer, x, cf, floor):
    def eager(native: bool, dense: bool = True, gathered: bool = True, triton_from_native: bool = True,
              gather_min: int = GATHER_MIN, slotted: bool = True):
        def call():
            native_forward.set_enabled(native)
            native_forward.set_dense_enabled(dense)
            native_forward.set_gathered_enabled(gathered)
            native_forward.set_slotted_enabled(slotted)
            native_forward.set_triton_from_native(triton_from_native)
            native_forward._GATHER_MIN_ELEMENTS = gather_min
            with torch.no_grad():
                layer(x, capacity_factor=cf)
        return call

    graph, _ = capture_no_grad(lambda: layer(x, capacity_factor=cf), warmup=3)
    calls = {"floor": floor, "native": eager(True), "python": eager(False), "graphed": graph.replay}
    full_path = eager(True)
    calls["no_repeat"] = lambda: (layer.__dict__.pop("_repeat_calls", None), full_path())
    with torch.no_grad():
        plan = native_forward.plan_for(layer, x, layer.resolve_knobs(capacity_factor=cf))
    if plan is not None and plan.dense:   # A/B rows only where the switch changes the call
        calls["no_dense"] = eager(True, dense=False)
    if plan is not None and plan.gathered_fc1:
        calls["no_gather"] = eager(True, gathered=False)
        native_forward.set_gathered_enabled(False)
        calls["graphed_no_gather"] = capture_no_grad(lambda: layer(x, capacity_factor=cf), warmup=3)[0].replay
        native_forward.set_gathered_enabled(True)
        calls["triton_py"] = eager(True, triton_from_native=False)
        calls["gather_all"] = eager(True, gather_min=0)
    native = ops._native.loaded()
    if native is not None and layer.config.num_experts <= native.max_gate_experts:
        def gate_kernel_off(fn):
            def call():
                native.set_gate_kernel_enabled(False)
                try:
                    fn()
                finally:
                    native.set_gate_kernel_enabled(True)
            return call
        calls["no_gate_kernel"] = gate_kernel_off(eager(True))
        native.set_gate_kernel_enabled(False)
        calls["graphed_no_gate_kernel"] = capture_no_grad(lambda: layer(x, capacity_factor=cf), warmup=3)[0].replay
        native.set_gate_kernel_enabled(True)
    if plan is not None and plan.slotted:
        calls["no_slots"] = eager(True, slotted=False)
        native_forward.set_slotted_enabled(False)
        calls["graphed_no_slots"] = capture_no_grad(lambda: layer(x, capacity_factor=cf), warmup=3)[0].replay
        native_forward.set_slotted_enabled(True)
    return calls


def run_config(name: str, iters: int, routing: str, tokens: int | None = None,
               modes: tuple[str, ...] = ("cf=1", "dropless")) -> None:
    cfg = dict(CONFIGS[name], **({"T": tokens} if tokens else {}))
    T, D, E, K = cfg["T"], cfg["D"], cfg["E"], cfg["K"]
    dtype = DTYPES[cfg["dtype"]]
    torch.manual_seed(0)
    layer = build_layer(cfg, "cuda")
    x = torch.randn(T, D, device="cuda", dtype=dtype)
    if routing == "balanced":
        balance_routing(layer, x, K)
    w1, w2 = layer.experts.batched_fc1_w, layer.experts.batched_fc2_w
    xf = torch.randn(E, T * K // E, D, device="cuda", dtype=dtype)

    def floor():
        with torch.no_grad():
            torch.bmm(torch.relu(torch.bmm(xf, w1.transpose(1, 2))), w2)

    for mode in modes:
        cf = {"cf=1": 1.0, "dropless": 0.0}[mode]
        calls = variants(layer, x, cf, floor)
        names = list(calls)
        burn = time.perf_counter()
        while time.perf_counter() - burn < 2.0:
            for fn in calls.values():
                fn()
        torch.cuda.synchronize()
        gpu = {n: [] for n in names}
        host = {n: [] for n in names}
        for i in range(iters):
            for j in range(len(names)):
                n = names[(i + j) % len(names)]
                ms, us = timed(calls[n])
                gpu[n].append(ms)
                host[n].append(us)
        native_forward.set_enabled(True)
        native_forward.set_dense_enabled(True)
        native_forward.set_gathered_enabled(True)
        native_forward.set_slotted_enabled(True)
        native_forward.set_triton_from_native(True)
        native_forward._GATHER_MIN_ELEMENTS = GATHER_MIN
        med = {n: statistics.median(gpu[n]) for n in names}
        cells = "  ".join(f"{n} {med[n]:.3f} ms ({med[n] / med['floor']:.2f}x, host {statistics.median(host[n]):.0f} us)"
                          for n in names)
        print(f"{name:<12} T={T:<6} {mode:<9} {cells}", flush=True)
    del layer, x, xf
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", default=list(CONFIGS))
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--routing", default="random", choices=["random", "balanced"])
    ap.add_argument("--spin", action="store_true", help="wait for each call by polling its end event")
    ap.add_argument("--tokens", type=int, default=None, help="override T (e.g. small serving batches)")
    ap.add_argument("--modes", default="cf=1,dropless", help="capacity modes in the order measured")
    args = ap.parse_args()
    global SPIN
    SPIN = args.spin
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} | routing {args.routing} | spin {SPIN} | "
          f"median of {args.iters} interleaved isolated calls")
    for name in args.configs:
        run_config(name, args.iters, args.routing, args.tokens, tuple(args.modes.split(",")))


if __name__ == "__main__":
    main()
