"""Device time of the row movers' kernels alone (torch.profiler, mean of 20 calls), for A/B of
kernel changes: bench_ops.py's event timing includes each op's host time before its launch.

    python3 scripts/row_mover_kernel_times.py
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import adaptmoe.ops as ops  # noqa: E402
from scripts.bench_ops import kernel_events, row_mover_cases  # noqa: E402


def main():
    for name, T, D, E, K, x, _, w, slots, y in row_mover_cases():
        R = T * K
        for op, fn in (("combine", lambda: ops.combine(y, slots, w)), ("dispatch", lambda: ops.dispatch(x, slots, R))):
            for e in kernel_events(fn, 20):
                t = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
                if e.count >= 20 and t > 5:
                    moved = (T + R) * D * 2
                    print(f"{name:8s} {op:9s} {e.key[:60]:60s} {t:8.1f} us  {moved / t / 1e3:7.1f} GB/s")


if __name__ == "__main__":
    main()
