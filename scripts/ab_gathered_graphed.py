"""Interleaved A/B (device machine): a dropless no-grad forward replayed from a CUDA graph with the
gathered Triton first GEMM on and off, and the cf=1 forward, balanced routing, per config.

    python3 scripts/ab_gathered_graphed.py [dsv3 fine64 ...] [--iters N]

Each round replays the three graphs back to back in a rotating order (CUDA events around each
replay, a sync after it); medians over the rounds. GPU time only: no host work per replay.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from adaptmoe import native_forward
from adaptmoe.examples.bench_layer import CONFIGS, DTYPES, balance_routing, build_layer
from adaptmoe.examples.timing import capture_no_grad, time_call


def run(name: str, iters: int) -> None:
    cfg = CONFIGS[name]
    layer = build_layer(cfg, "cuda").eval()
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=DTYPES[cfg["dtype"]])
    balance_routing(layer, x, cfg["K"])
    graphs = {}
    for label, cf, gathered in (("dropless gathered", 0.0, True), ("dropless grouped_mm", 0.0, False),
                                ("cf=1", 1.0, True)):
        native_forward.set_gathered_enabled(gathered)
        graphs[label] = capture_no_grad(lambda cf=cf: layer(x, capacity_factor=cf))[0]
    native_forward.set_gathered_enabled(True)
    samples = {label: [] for label in graphs}
    labels = list(graphs)
    for i in range(iters):
        for label in labels[i % 3:] + labels[:i % 3]:
            samples[label].append(time_call(graphs[label].replay, "cuda"))
    medians = {label: statistics.median(v) for label, v in samples.items()}
    for label, ms in medians.items():
        print(f"{name:<8} {label:<20} {ms:8.3f} ms  x cf=1 {ms / medians['cf=1']:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*", default=["dsv3", "fine64", "mixtral"])
    ap.add_argument("--iters", type=int, default=40)
    args = ap.parse_args()
    print(torch.cuda.get_device_name())
    for name in args.configs:
        run(name, args.iters)


if __name__ == "__main__":
    main()
