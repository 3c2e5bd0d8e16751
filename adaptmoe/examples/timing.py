"""Timing shared by the benchmarks: CUDA events on a GPU, perf_counter elsewhere, medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def time_call(fn: Callable[[], object], device: str) -> float:
    """Milliseconds of one call, waiting for its result."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], object], device: str, iters: int, warmup: int = 3) -> float:
    """Median of ``iters`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_call(fn, device) for _ in range(max(iters, 1)))
