"""Host time of an op when it is the first GPU work after a synchronize vs right after another op.

    python scripts/first_launch_cost.py

Isolated-call benchmarks start every call on an idle GPU; if the first launch after a sync costs
far more host time than later ones, every isolated call pays it once (the floor included).
Waits compared after ~1 ms of GPU work: "sync" (Event.synchronize, what examples.timing did),
"spin" (polling Event.query), "sleep" (sync, then 2 ms of time.sleep: an idle host).
"""
from __future__ import annotations

import statistics
import time

import torch


def wait(how: str) -> None:
    """Ends ~1 ms of GPU work (torch.cuda._sleep) the way a timing loop would wait for it."""
    torch.cuda._sleep(1_500_000)
    done = torch.cuda.Event()
    done.record()
    if how == "spin":
        while not done.query():
            pass
    else:
        done.synchronize()
    if how == "sleep":
        time.sleep(0.002)


def first_and_second(fn, how: str, reps: int = 40) -> tuple[float, float]:
    first, second = [], []
    for _ in range(reps):
        wait(how)
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
    for how in ("sync", "spin", "sleep"):
        for name, fn in rows.items():
            a, b = first_and_second(fn, how)
            print(f"{how:<5}  {name:<30} first {a:7.1f} us   second {b:7.1f} us", flush=True)


if __name__ == "__main__":
    main()
