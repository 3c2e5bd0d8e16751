"""CUDA-graph replay against eager calls, for the GPU tests."""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from adaptmoe.examples.timing import capture_no_grad


def replays_and_eager(call: Callable[[], torch.Tensor], x: torch.Tensor,
                      times: int = 2) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Captures ``call()`` once (no_grad); then ``times`` times writes fresh values into ``x`` (the
    captured input), replays the graph and yields (replayed output, an eager no_grad call's output)."""
    graph, out = capture_no_grad(call)
    for _ in range(times):
        x.copy_(torch.randn_like(x))
        graph.replay()
        with torch.no_grad():
            ref = call()
        yield out, ref   # outside no_grad: grad mode is global, the caller's loop body runs here
