"""Host time of an op when it is the first GPU work after a synchronize vs right after another op.

    python scripts/first_launch_cost.py

Isolated-call benchmarks start every call on an idle GPU; if the first launch after a sync costs
far more host time than later ones, every isolated call pays it once (the floor included).
"""
from __future__ import annotations

import statistics
import time

import torch


def first_and_second(fn, reps: int = 40, idle_s: float = 0.0) -> tuple[float, float]:
    first, second = [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        if idle_s:
            time.sleep(idle_s)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        fn()
        t2 = time.perf_counter()
        first.append((t1 - t0) * 1e6)
        second.append((t2 - t1) * 1e6)
    return statistics.median(first), statistics.median(second)


def main() -> None:
    bf = torch.bfloat16
    x = torch.randn(8192, 2048, device="cuda", dtype=bf)
    w = torch.randn(64, 2048, device="cuda", dtype=bf)
    xb = torch.randn(64, 1024, 2048, device="cuda", dtype=bf)
    wb = torch.randn(64, 1024, 2048, device="cuda", dtype=bf)
    small = torch.zeros(1024, device="cuda")
    rows = {
        "torch.mm (gate shape)": lambda: torch.mm(x, w.t()),
        "torch.bmm (fine64 experts)": lambda: torch.bmm(xb, wb.transpose(1, 2)),
        "small.add_(1) (elementwise)": lambda: small.add_(1),
        "torch.empty (allocator only)": lambda: torch.empty(4096, device="cuda"),
        "Event.record": lambda: torch.cuda.Event().record(),
    }
    for idle in (0.0, 0.002):
        for name, fn in rows.items():
            a, b = first_and_second(fn, idle_s=idle)
            print(f"idle {idle * 1e3:3.0f} ms  {name:<30} first {a:7.1f} us   second {b:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
