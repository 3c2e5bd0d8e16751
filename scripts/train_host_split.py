"""Where a training step's host time goes (device machine): per variant, the host time of the
forward call and of the backward call (perf_counter around each, no sync inside: the time until
their kernels are enqueued) and the step's GPU time (CUDA events, a sync after each step),
interleaved rounds, medians. Variants: cf=1, dropless in capacity slots, dropless on grouped_mm,
and slots without the overflow monitor's count (host time only). (A "no fix-up launches" variant
measured the Python launches of the fix-ups until the slotted GEMMs became native calls.)

    python3 scripts/train_host_split.py [fine64 ...] [--iters N]
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack
from unittest import mock

import torch

from adaptmoe.examples.bench_layer import CONFIGS, balance_routing, build_layer
from adaptmoe.ops import _triton_slotted

# label -> (capacity factor, slot path, patches of host work: (object, attribute, replacement))
VARIANTS = {
    "cf=1": (1.0, False, ()),
    "slots": (0.0, True, ()),
    "grouped_mm": (0.0, False, ()),
    "slots, no monitor": (0.0, True, ((_triton_slotted.OverflowMonitor, "host_count", lambda *a: None),)),
}


def step_fn(layer, x, cf, slots, patches):
    x_in = x.clone().requires_grad_(True)
    g = torch.randn_like(x)

    def step():
        with ExitStack() as stack:
            for obj, name, value in patches:
                stack.enter_context(mock.patch.object(obj, name, value))
            _triton_slotted.set_enabled(slots)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            t0 = time.perf_counter()
            y = layer(x_in, capacity_factor=cf)
            t1 = time.perf_counter()
            torch.autograd.backward([y, y.l_aux], [g, torch.ones_like(y.l_aux)])
            t2 = time.perf_counter()
            end.record()
            end.synchronize()
            for p in layer.parameters():
                p.grad = None
            x_in.grad = None
            return (t1 - t0) * 1e6, (t2 - t1) * 1e6, start.elapsed_time(end)
    return step


def run(name: str, iters: int) -> None:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
    balance_routing(layer, x, cfg["K"])
    steps = {label: step_fn(layer, x, *spec) for label, spec in VARIANTS.items()}
    for fn in steps.values():
        for _ in range(5):
            fn()
    samples = {label: [] for label in steps}
    labels = list(steps)
    for i in range(iters):
        for j in range(len(labels)):
            label = labels[(i + j) % len(labels)]
            samples[label].append(steps[label]())
    _triton_slotted.set_enabled(True)
    print(f"\n{name} (balanced): medians of {iters} interleaved steps")
    print(f"  {'variant':<28} {'fwd host us':>11} {'bwd host us':>11} {'step ms':>8}")
    for label, rows in samples.items():
        fwd, bwd, ms = (statistics.median(col) for col in zip(*rows))
        print(f"  {label:<28} {fwd:11.0f} {bwd:11.0f} {ms:8.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="*", default=["fine64"])
    ap.add_argument("--iters", type=int, default=40)
    args = ap.parse_args()
    _triton_slotted.MIN_GEMM_WORK = 0   # the slot path at any size
    print(torch.cuda.get_device_name(), flush=True)
    for name in args.configs:
        run(name, args.iters)


if __name__ == "__main__":
    main()
