"""Host time of one training step (forward + backward) of a bench_layer config, op by op: where a
step whose GPU work is short (Tutel's README layer in bf16) spends its host time.

    python scripts/profile_train_host.py [config] [--cf 1.0] [--rows 40] [--shapes]
"""
from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from adaptmoe.examples.bench_layer import CONFIGS, balance_routing, build_layer
from adaptmoe.examples.timing import median_ms


def training_step(config: str, cf: float, sync: bool = False):
    """One forward + backward of the config's layer on balanced tokens (gradients dropped after),
    ``sync``: waiting for the GPU at its end."""
    cfg = CONFIGS[config]
    torch.manual_seed(0)
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
    balance_routing(layer, x, cfg["K"])
    x.requires_grad_(True)
    g = torch.randn_like(x)

    def step():
        y = layer(x, capacity_factor=cf)
        torch.autograd.backward([y, y.l_aux], [g, torch.ones_like(y.l_aux)])
        if sync:
            torch.cuda.synchronize()
        for p in layer.parameters():
            p.grad = None
        x.grad = None
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="readme_bf16")
    ap.add_argument("--cf", type=float, default=1.0)
    ap.add_argument("--rows", type=int, default=40)
    ap.add_argument("--shapes", action="store_true", help="group the table by input shapes")
    args = ap.parse_args()
    step = training_step(args.config, args.cf)

    ms = median_ms(step, "cuda", 20, 5)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=args.shapes) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"{args.config} cf={args.cf}: step {ms:.3f} ms (isolated, median of 20)")
    table = prof.key_averages(group_by_input_shape=args.shapes)
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
