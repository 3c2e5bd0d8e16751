"""CUDA-graph replay against eager calls, for the GPU tests (and scripts/debug_capture_gshard.py)."""
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


class WithAux(torch.nn.Module):
    """A layer as torch.cuda.make_graphed_callables takes it: returns (y, y.l_aux)."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x_TD: torch.Tensor):
        y = self.layer(x_TD)
        return y, y.l_aux


def eager_step_then_forget(module: WithAux, x: torch.Tensor) -> None:
    """One eager training step of ``module`` on the default stream, then what capturing a step
    after it needs: ``forget_last_call()`` and no gradients left (the last call's graph, kept by
    the layer's l_aux, would otherwise break the backward capture)."""
    y, l_aux = module(x)
    torch.autograd.backward([y, l_aux], [torch.ones_like(y), torch.ones_like(l_aux)])
    del y, l_aux
    module.layer.forget_last_call()
    for p in module.layer.parameters():
        p.grad = None
