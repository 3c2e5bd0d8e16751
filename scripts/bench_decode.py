"""Decode kernels alone (no routing, no layer): adaptmoe::decode_ffn against the grouped_mm decode
path, each replayed from a CUDA graph, as bandwidth over the distinct selected experts' bytes;
then the per-kernel split from torch.profiler. Mixtral shapes by default, bf16, one GPU.

    python scripts/bench_decode.py [--tokens 1,4,16,32,64] [--iters 50]
"""
from __future__ import annotations

import argparse

import torch

from adaptmoe import decode
from adaptmoe.examples.timing import capture_no_grad, median_ms
from adaptmoe.expert_compute import FFNWeights
from adaptmoe.ops._decode_op import decode_ffn

D, H, E, K = 4096, 14336, 8, 2


def graph_ms(fn, iters: int) -> float:
    """Median ms of ``fn`` replayed from a CUDA graph (its tensors need no gradient)."""
    graph, _ = capture_no_grad(fn)
    return median_ms(graph.replay, "cuda", iters)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", default="1,4,16,32,64")
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    torch.manual_seed(0)
    bf = torch.bfloat16
    w1 = torch.randn(E, H, D, device="cuda", dtype=bf) * D ** -0.5
    w2 = torch.randn(E, H, D, device="cuda", dtype=bf) * H ** -0.5
    w3 = torch.randn(E, H, D, device="cuda", dtype=bf) * D ** -0.5
    silu = torch.nn.functional.silu
    print(f"{torch.cuda.get_device_name()} | bf16 D={D} H={H} E={E} k={K} | CUDA-graph replay, median of {args.iters}")
    print(f"{'kind':>6} {'T':>4} {'distinct':>8} {'MB':>7} {'native ms':>10} {'GB/s':>7} {'grouped ms':>11} {'GB/s':>7}")
    for gated in (True, False):
        weights = FFNWeights(w1, w2, None, None, w3 if gated else None)
        mats = 3 if gated else 2
        for T in [int(t) for t in args.tokens.split(",")]:
            x = torch.randn(T, D, device="cuda", dtype=bf)
            scores = torch.rand(T, E, device="cuda")
            w_TK, e_TK = scores.topk(K, dim=1)
            distinct = int(e_TK.unique().numel())
            nbytes = distinct * mats * H * D * 2
            native = graph_ms(lambda: decode_ffn(x, e_TK, w_TK, True, tuple(weights), silu, 0, torch.float32), args.iters)
            grouped = graph_ms(lambda: decode.selected_expert_ffn(x, e_TK, w_TK, weights, silu, method="grouped_mm"),
                               args.iters)
            print(f"{'gated' if gated else 'ffn':>6} {T:>4} {distinct:>8} {nbytes / 1e6:7.0f} {native:10.3f} "
                  f"{nbytes / native / 1e6:7.0f} {grouped:11.3f} {nbytes / grouped / 1e6:7.0f}")
    x = torch.randn(16, D, device="cuda", dtype=bf)
    w_TK, e_TK = torch.rand(16, E, device="cuda").topk(K, dim=1)
    weights = FFNWeights(w1, w2, None, None, w3)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
        for _ in range(10):
            decode_ffn(x, e_TK, w_TK, True, tuple(weights), silu, 0, torch.float32)
        torch.cuda.synchronize()
    print("\nper-kernel split, gated T=16 (10 calls):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6, max_name_column_width=60))


if __name__ == "__main__":
    main()
