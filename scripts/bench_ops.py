"""Micro-benchmark of the native row movers (device machine): achieved bandwidth per op.

    python3 scripts/bench_ops.py
Bytes counted: each input row read once, each output row written once (the floor).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import adaptmoe.ops as ops  # noqa: E402
from adaptmoe.examples.timing import median_ms  # noqa: E402


def kernel_events(fn, calls: int, warmup: int = 3):
    """torch.profiler's per-kernel averages (CUDA activity) over ``calls`` calls of ``fn`` after
    ``warmup`` untimed ones: device time without each call's host time."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof.key_averages()


def row_mover_cases():
    """(name, T, D, E, K, x_TD, idx_TK, w_TK, slots_TK, y_RD) per benchmark shape: bf16 rows,
    random routing, dropless slots (R = T*K)."""
    for name, T, D, E, K in (("fine64", 8192, 2048, 64, 8), ("mixtral", 8192, 4096, 8, 2), ("dsv3", 16384, 7168, 256, 8)):
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        idx = torch.rand(T, E, device="cuda").topk(K, 1).indices
        w = torch.rand(T, K, device="cuda")
        _, _, slots = ops.assign_slots(idx, E, None)
        y = torch.randn(T * K, D, device="cuda", dtype=torch.bfloat16)
        yield name, T, D, E, K, x, idx, w, slots, y


def main():
    print(f"native: {ops.native_status()}")
    for name, T, D, E, K, x, idx, w, slots, y in row_mover_cases():
        R = T * K
        g = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        from adaptmoe.ops._ops import combine_backward_op, dispatch_backward_op
        rows = {
            "dispatch": (lambda: ops.dispatch(x, slots, R), (T + R) * D * 2),
            "combine": (lambda: ops.combine(y, slots, w), (T + R) * D * 2),
            "combine_bwd(+dot)": (lambda: combine_backward_op(g, y, slots, w, True), (T + 2 * R) * D * 2),
            "dispatch_bwd": (lambda: dispatch_backward_op(y, x, slots, None, False), (T + R) * D * 2),
            "route_topk": (lambda: ops.route_topk(torch.randn(T, E, device="cuda"), K), T * E * 4 * 2),
            "assign_slots": (lambda: ops.assign_slots(idx, E, None), T * K * 8 * 4),
            "copy(ref)": (lambda: y.clone(), 2 * R * D * 2),
        }
        for op, (fn, nbytes) in rows.items():
            t = median_ms(fn, "cuda", iters=30, warmup=5)
            print(f"{name:8s} {op:18s} {t * 1e3:9.1f} us  {nbytes / t / 1e6:8.1f} GB/s")


if __name__ == "__main__":
    main()
