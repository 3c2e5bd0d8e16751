"""The gate GEMM (logits = x @ wg^T) through torch.mm vs the extension's cached-plan cuBLASLt GEMM
(bmm_nt_act, one batch): host time of a call right after a sync, GPU time, and whether both
give the same bits, per bench_layer config and a few small shapes.

    python scripts/gate_gemm_host_cost.py
"""
from __future__ import annotations

import statistics
import time

import torch

from adaptmoe.ops import _native

SHAPES = {"fine64": (8192, 2048, 64), "readme": (8192, 2048, 2), "mixtral": (8192, 4096, 8),
          "dsv3": (16384, 7168, 256), "small": (37, 64, 8), "odd": (123, 72, 6), "T1": (1, 2048, 64)}


def isolated(fn, iters=200):
    host, gpu = [], []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e6)
        end.record()
        end.synchronize()
        gpu.append(start.elapsed_time(end) * 1e3)
    return statistics.median(host), statistics.median(gpu)


def main() -> None:
    native = _native.for_tensor(torch.empty(1, device="cuda"))
    print(f"{'shape':<8} {'T':>6} {'D':>5} {'E':>4}  mm host/gpu us   lt host/gpu us   same bits")
    for name, (T, D, E) in SHAPES.items():
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(T, D, device="cuda", dtype=dtype)
            wg = torch.randn(E, D, device="cuda", dtype=dtype) * 0.02
            mm = lambda: torch.mm(x, wg.t())
            lt = lambda: native.bmm_nt_act(x.unsqueeze(0), wg.unsqueeze(0), None, 0, False)
            try:
                same = torch.equal(mm(), lt()[0])
                (mh, mg), (lh, lg) = isolated(mm), isolated(lt)
                print(f"{name:<8} {T:>6} {D:>5} {E:>4}  {mh:6.1f} {mg:7.1f}   {lh:6.1f} {lg:7.1f}   {same} {dtype}")
            except RuntimeError as err:
                print(f"{name:<8} {T:>6} {D:>5} {E:>4}  cuBLASLt: {err} {dtype}")


if __name__ == "__main__":
    main()
