"""Planner sweep: for each config, measure every feasible plan and compare with the planner's pick.

    python -m adaptmoe.examples.bench_planner [--quick]                 # one GPU (or CPU, tiny)
    torchrun --nproc_per_node 2 -m adaptmoe.examples.bench_planner       # 2 GPUs: r, d, algorithm

For each config (shapes of anchor-figures.md at several token counts and k): the planner ranks
plans from its cost model (no tuning); every feasible plan is then timed on a training step
(fwd + bwd, bf16, CUDA events, median after warmup) with its knobs passed explicitly. Printed:
the pick, its predicted and measured ms, the best measured plan, pick/best, and Tutel's default
(adaptive_r=1, d=1, flat) for comparison; an indented line gives the calibration (shortest
training call, extra cost of one overlap chunk) and every plan's predicted and measured ms.
Summary: share of configs whose pick (and tuned pick) is within 5% of the best, and the
|predicted - measured| / measured of the model's picks and of the tuned picks.
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.distributed as dist

import adaptmoe as am
from adaptmoe.planning import PlanningOptions
from adaptmoe.examples.timing import median_ms

# (name, T per rank, D, H, E, k)
CONFIGS = [
    ("mixtral", 8192, 4096, 14336, 8, 2), ("mixtral", 2048, 4096, 14336, 8, 2), ("mixtral-k1", 8192, 4096, 14336, 8, 1),
    ("fine64", 8192, 2048, 1024, 64, 8), ("fine64", 2048, 2048, 1024, 64, 8), ("fine64-k2", 8192, 2048, 1024, 64, 2),
    ("readme", 8192, 2048, 2048, 2, 2), ("readme", 1024, 2048, 2048, 2, 2), ("readme-k1", 16384, 2048, 2048, 2, 1),
    ("small", 4096, 1024, 4096, 16, 2), ("small", 512, 1024, 4096, 16, 2), ("wide", 4096, 4096, 4096, 32, 4),
]
TUNED_CANDIDATES = 3   # PlanningOptions.candidates: how many plans warmup tuning measures
QUICK = [("tiny", 256, 64, 128, 4, 2), ("tiny", 64, 64, 128, 4, 1)]


def setup() -> tuple[int, int, torch.device]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    return rank, world, torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def time_step_ms(layer, x, knobs: dict, iters: int, warmup: int) -> float:
    def step():
        layer(x, **knobs).sum().backward()
    ms = torch.tensor([median_ms(step, x.device.type, iters, warmup)], dtype=torch.float64)
    if dist.is_initialized():
        ms = ms.to(x.device)
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)   # the slowest rank bounds the step
    return float(ms.cpu())


def run_config(name, T, D, H, E, k, world, device, dtype, iters, warmup):
    cfg = am.MoEConfig(model_dim=D, num_experts=E, plan="auto", gate=am.GateConfig(top_k=k, capacity_factor=1.0),
                       experts=am.ExpertConfig(hidden_size=H, has_fc1_bias=False, has_fc2_bias=False))
    layer = am.MoELayer(cfg, planning=PlanningOptions(tune=False, use_cache=False)).to(device, dtype)
    x = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    planner = layer.planner
    planner._ensure_hardware(device)
    sig = planner.signature(k, 1.0, dtype, True)
    ranked = [c for c in planner._rank(T, sig) if c.feasible]
    measured = {}
    for cand in ranked:
        p = cand.plan
        knobs = dict(adaptive_r=p.adaptive_r, a2a_ffn_overlap_degree=p.overlap_degree, a2a_algo=p.a2a_algo,
                     plan="fixed")
        measured[p] = time_step_ms(layer, x, knobs, iters, warmup)
    pick = ranked[0]
    best = min(measured, key=measured.get)
    # What warmup tuning locks: the fastest measured among the model's top candidates.
    tuned = min((c.plan for c in ranked[:TUNED_CANDIDATES]), key=measured.get)
    tutel = measured.get(next((c.plan for c in ranked if (c.plan.adaptive_r, c.plan.overlap_degree,
                                                          c.plan.a2a_algo) == (1, 1, "flat")), pick.plan))
    predicted = {c.plan: c.predicted_ms for c in ranked}
    model = planner.device_model
    return dict(config=f"{name} T={T} D={D} H={H} E={E} k={k} W={world}", pick=pick.plan.label(),
                predicted=pick.predicted_ms, measured=measured[pick.plan], best=best.label(),
                best_ms=measured[best], tutel_ms=tutel, candidates=len(ranked), tuned=tuned.label(),
                tuned_ms=measured[tuned], tuned_predicted=predicted[tuned],
                plans=[(p.label(), predicted[p], measured[p]) for p in measured],
                calibration=(model.train_call_overhead_us, model.train_chunk_overhead_us))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    rank, world, device = setup()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = QUICK if args.quick or device.type != "cuda" else CONFIGS
    rows = []
    for name, T, D, H, E, k in configs:
        if E % world and world % E:
            continue
        rows.append(run_config(name, T, D, H, E, k, world, device, dtype, args.iters, args.warmup))
        if rank == 0:
            r = rows[-1]
            print(f"{r['config']:<46} pick {r['pick']:<22} pred {r['predicted']:8.3f} meas {r['measured']:8.3f} "
                  f"| best {r['best']:<22} {r['best_ms']:8.3f} | pick/best {r['measured'] / r['best_ms']:.3f} "
                  f"| tuned {r['tuned']:<22} {r['tuned_ms']:8.3f} | tutel-default {r['tutel_ms']:8.3f} "
                  f"| {r['candidates']} plans", flush=True)
            print(f"    shortest train call {r['calibration'][0]:.0f} us, extra overlap chunk "
                  f"{r['calibration'][1]:.0f} us; " + "; ".join(f"{label}: pred {p:.3f} meas {m:.3f}"
                                                            for label, p, m in r["plans"]), flush=True)
    if rank == 0 and rows:
        within = sum(r["measured"] <= 1.05 * r["best_ms"] for r in rows)
        tuned_within = sum(r["tuned_ms"] <= 1.05 * r["best_ms"] for r in rows)
        errors = [abs(r["predicted"] - r["measured"]) / r["measured"] for r in rows]
        tuned_errors = [abs(r["tuned_predicted"] - r["tuned_ms"]) / r["tuned_ms"] for r in rows]
        worse_than_tutel = max(r["measured"] / r["tutel_ms"] for r in rows)
        tuned_vs_tutel = max(r["tuned_ms"] / r["tutel_ms"] for r in rows)
        print(f"\ndevice {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, world {world}, "
              f"{dtype}, torch {torch.__version__}")
        print(f"pick within 5% of best: {within}/{len(rows)}; median |pred-meas|/meas of picks: "
              f"{statistics.median(errors):.1%} (max {max(errors):.1%}); worst pick/tutel-default: {worse_than_tutel:.3f}")
        print(f"after warmup tuning (top {TUNED_CANDIDATES} measured): within 5% of best: {tuned_within}/{len(rows)}; "
              f"worst tuned/tutel-default: {tuned_vs_tutel:.3f}; |pred-meas|/meas of tuned picks: median "
              f"{statistics.median(tuned_errors):.1%}, max {max(tuned_errors):.1%}, within 25%: "
              f"{sum(e <= 0.25 for e in tuned_errors)}/{len(rows)}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
