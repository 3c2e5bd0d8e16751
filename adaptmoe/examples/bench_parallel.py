"""Multi-rank benchmark of one MoE layer's training step per (adaptive_r, overlap d, algorithm).

    torchrun --nproc_per_node=2 -m adaptmoe.examples.bench_parallel [--configs mixtral,fine]

A step is what Tutel's helloworld times: forward, backward and an SGD update of one layer
(bf16, relu FFN experts with biases, top-k softmax gate). Reported per setting: median step
(ms, the max over ranks of each rank's median), the ratio to a compute floor measured in the
same run (the local experts' two batched matmuls, forward + backward, balanced load, no
routing and no communication), and Tutel's 2 x H200 figure where anchor-figures.md has one.
Also: raw ``all_to_all_single`` bus bandwidth per message size next to ours
(``adaptmoe.comm``), and a switch-cost check (alternating r or d between consecutive calls
against the steady state of each setting).
Legend: T tokens per rank, D model dim, H hidden, E experts, k top-k, W ranks.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess


import torch
import torch.distributed as dist

from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer, comm
from adaptmoe.examples.timing import time_call

DEV = "cuda"   # "cpu" with --tiny (a smoke run of this script over gloo)
CONFIGS = {
    "tiny": dict(T=64, D=16, H=32, E=4, k=2, tutel_ms={"EP": 1.0}),
    "mixtral": dict(T=8192, D=4096, H=14336, E=8, k=2, tutel_ms={"EP": 21.8, "DP": 31.7, "EP d=2": 22.2}),
    "fine": dict(T=8192, D=2048, H=1024, E=64, k=8, tutel_ms={"EP": 12.7, "DP": 14.2, "EP d=2": 14.5,
                                                              "EP dropless": 13.5}),
}


def _max_over_ranks(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=DEV)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _time_steps(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    if DEV == "cuda":
        torch.cuda.synchronize()
    dist.barrier()   # every rank starts timing together
    return [time_call(fn, DEV) for _ in range(iters)]


def compute_floor(e: int, rows: int, D: int, H: int, iters: int) -> float:
    """fwd+bwd of relu(x W1^T + b1) W2 + b2 on [e, rows, D], bf16, balanced: the step's floor."""
    x = torch.randn(e, rows, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.randn(e, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(e, H, D, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(e, rows, D, device=DEV, dtype=torch.bfloat16)

    def step():
        y = torch.bmm(torch.relu(torch.bmm(x, w1.transpose(1, 2))), w2)
        torch.autograd.backward(y, dy)
    return statistics.median(_time_steps(step, iters, 3))


def bench_layer(name: str, cfg: dict, args, rank: int, W: int) -> None:
    T, D, H, E, k = cfg["T"], cfg["D"], cfg["H"], cfg["E"], cfg["k"]
    config = MoEConfig(model_dim=D, num_experts=E, gate=GateConfig(top_k=k, capacity_factor=1.0),
                       experts=ExpertConfig(hidden_size=H, activation="relu"))
    layer = MoELayer(config, seeds=(1, 2 + rank, 3)).to(DEV, torch.bfloat16)
    opt = torch.optim.SGD(layer.parameters(), lr=1e-6)
    gen = torch.Generator(device=DEV).manual_seed(10 + rank)
    x = torch.randn(T, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    dy = torch.randn(T, D, device=DEV, dtype=torch.bfloat16, generator=gen)
    storage = [(p.data_ptr(), tuple(p.shape)) for p in layer.parameters()]

    def make_step(r, d, algo, cf):
        def step():
            opt.zero_grad(set_to_none=True)
            y = layer(x, adaptive_r=r, a2a_ffn_overlap_degree=d, a2a_algo=algo, capacity_factor=cf)
            torch.autograd.backward(y, dy)
            opt.step()
        return step

    e = E // W if E >= W else 1
    rows = W * k * (T // E) if E >= W else k * T // E * W // (W // E)
    floor = _max_over_ranks(compute_floor(e, rows, D, H, args.iters))
    if rank == 0:
        print(f"\n== {name}: T={T}/rank D={D} H={H} E={E} k={k} W={W} bf16, train step (fwd+bwd+SGD)")
        print(f"compute floor (local experts fwd+bwd, balanced bmm, no comm): {floor:.2f} ms")
        print(f"{'r':>2} {'d':>2} {'algo':>5} {'cf':>4} | {'step ms':>8} {'/floor':>7} {'/Tutel best':>11}")
    tutel_best = cfg["tutel_ms"]["EP"]
    results = _measure_settings(_settings(layer, args), make_step, args, rank, floor, tutel_best)
    assert storage == [(p.data_ptr(), tuple(p.shape)) for p in layer.parameters()], "parameter storage moved"
    if rank == 0 and results:
        best = min(results.items(), key=lambda kv: kv[1])
        print(f"best {name}: r={best[0][0]} d={best[0][1]} {best[0][2]} cf={best[0][3]}: {best[1]:.2f} ms = "
              f"{best[1] / tutel_best:.2f}x Tutel's {tutel_best} ms (EP), {best[1] / floor:.2f}x the floor")
    _switch_cost(layer, results, make_step, args, rank)
    torch.cuda.empty_cache() if DEV == "cuda" else None


def _settings(layer, args) -> list[tuple]:
    """(r, d, algo, cf) to measure: every valid r; d and the algorithm only matter with r > 0."""
    return [(r, d, algo, cf) for cf in args.cfs for r in layer.valid_adaptive_rs
            for d in (args.ds if r > 0 else [1]) for algo in (args.algos if r > 0 else ["flat"])]


def _measure_settings(settings, make_step, args, rank: int, floor: float, tutel_best: float) -> dict:
    results = {}
    for r, d, algo, cf in settings:
        try:
            times = _time_steps(make_step(r, d, algo, cf), args.iters, args.warmup)
        except torch.cuda.OutOfMemoryError:   # every rank runs out together (same shapes): skip on all
            if rank == 0:
                print(f"{r:>2} {d:>2} {algo:>5} {cf:>4} | out of memory")
            torch.cuda.empty_cache()
            continue
        ms = _max_over_ranks(statistics.median(times))
        results[(r, d, algo, cf)] = ms
        if rank == 0:
            print(f"{r:>2} {d:>2} {algo:>5} {cf:>4} | {ms:8.2f} {ms / floor:7.2f} {ms / tutel_best:11.2f}", flush=True)
    return results


def _switch_cost(layer, results: dict, make_step, args, rank: int) -> None:
    """Alternate two settings call by call and compare with their steady states."""
    pairs = []
    if len(layer.valid_adaptive_rs) > 1:
        pairs.append(((0, 1, "flat", 1.0), (1, 1, "flat", 1.0)))
    pairs.append(((1, 1, "flat", 1.0), (1, 2, "flat", 1.0)))
    for a, b in pairs:
        if a not in results or b not in results:
            continue
        steps = [make_step(*a), make_step(*b)]
        calls = {"n": 0}

        def alternate():
            steps[calls["n"] % 2]()
            calls["n"] += 1
        times = _time_steps(alternate, 2 * args.iters, 2)
        ta = _max_over_ranks(statistics.median(times[0::2]))
        tb = _max_over_ranks(statistics.median(times[1::2]))
        if rank == 0:
            print(f"switch {a[:2]} <-> {b[:2]} every call: {ta:.2f} / {tb:.2f} ms vs steady "
                  f"{results[a]:.2f} / {results[b]:.2f} ms (ratio {ta / results[a]:.2f} / {tb / results[b]:.2f})")


def bench_bandwidth(args, rank: int, W: int) -> None:
    if rank == 0:
        print("\n== all_to_all bus bandwidth, bf16, per-rank buffer; busbw = bytes*(W-1)/W / time")
        print(f"{'size':>9} | {'raw GB/s':>9} {'ours GB/s':>9} {'ours/raw':>8}")
    group = dist.group.WORLD
    for mib in args.bw_mib:
        n = mib * 2 ** 20 // 2
        x = torch.randn(n, device=DEV, dtype=torch.bfloat16)
        out = torch.empty_like(x)
        raw = statistics.median(_time_steps(lambda: dist.all_to_all_single(out, x, group=group), args.iters, 3))
        xw = x.view(W, -1)
        ex = comm.FlatExchange(group)
        ours = statistics.median(_time_steps(lambda: comm.exchange(xw, ex), args.iters, 3))
        raw, ours = _max_over_ranks(raw), _max_over_ranks(ours)
        bus = mib * 2 ** 20 * (W - 1) / W / 1e9
        if rank == 0:
            print(f"{mib:>5} MiB | {bus / raw * 1e3:9.1f} {bus / ours * 1e3:9.1f} {raw / ours:8.2f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="mixtral,fine")
    p.add_argument("--ds", default="1,2,4")
    p.add_argument("--algos", default="flat,2d")
    p.add_argument("--cfs", default="1.0,0.0")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--bw-mib", default="1,4,16,64,256,1024")
    p.add_argument("--tiny", action="store_true", help="CPU/gloo smoke run of this script")
    args = p.parse_args()
    global DEV
    if args.tiny:
        DEV, args.configs, args.bw_mib, args.iters = "cpu", "tiny", "1", 3
    args.ds = [int(v) for v in args.ds.split(",")]
    args.algos = args.algos.split(",")
    args.cfs = [float(v) for v in args.cfs.split(",")]
    args.bw_mib = [int(v) for v in args.bw_mib.split(",") if v]
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if DEV == "cuda":
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")
    rank, W = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = "?"
        print(f"device {torch.cuda.get_device_name() if DEV == 'cuda' else 'cpu'} x{W}, torch {torch.__version__}, commit {commit or '?'}")
    if args.bw_mib:
        bench_bandwidth(args, rank, W)
    for name in args.configs.split(","):
        bench_layer(name, CONFIGS[name], args, rank, W)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
