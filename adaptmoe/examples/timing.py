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


def pipelined_ms(fn: Callable[[], object], calls: int = 20, reps: int = 5, warmup: int = 3) -> float:
    """Milliseconds per call of ``calls`` CUDA calls enqueued back to back (median over ``reps``):
    the host runs ahead of the GPU as in a model's forward, so per-call host time that is shorter
    than the GPU time is hidden (unlike ``median_ms``'s isolated calls)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(max(reps, 1)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


def capture_no_grad(fn: Callable[[], object], warmup: int = 1):
    """``fn()`` under no_grad, run ``warmup`` times on a side stream (lazy inits, allocator pools,
    cuBLAS handles happen outside the capture), then captured once in a CUDA graph. Returns
    (graph, the captured call's output); ``graph.replay()`` recomputes that output in place."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        out = fn()
    return graph, out
