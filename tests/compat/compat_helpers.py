"""Shared checks of the compat tests: same outputs and gradients for two modules fed the same input."""
from __future__ import annotations

import torch


def weighted_sum(y: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient differs per output element (ones would hide wrong indexing)."""
    return (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum()


def run(module, x, call=lambda m, x: m(x)):
    x = x.clone().requires_grad_(True)
    y = call(module, x)
    y_main = y[0] if isinstance(y, tuple) else y
    loss = weighted_sum(y_main) + (sum(weighted_sum(t) for t in y[1:]) if isinstance(y, tuple) else 0)
    loss.backward()
    return y, x.grad


def assert_same(a, b, x, pairs, *, call_a=lambda m, x: m(x), call_b=lambda m, x: m(x), rtol=1e-6, atol=1e-6):
    """``pairs``: [(name, param_of_a, param_of_b, transform_b_grad_to_a)]; compares outputs and grads."""
    for _, pa, pb, _ in pairs:
        pa.grad = pb.grad = None
    ya, gxa = run(a, x, call_a)
    yb, gxb = run(b, x, call_b)
    ya = ya if isinstance(ya, tuple) else (ya,)
    yb = yb if isinstance(yb, tuple) else (yb,)
    for i, (u, v) in enumerate(zip(ya, yb)):
        torch.testing.assert_close(u, v, rtol=rtol, atol=atol, msg=lambda m: f"output {i}: {m}")
    torch.testing.assert_close(gxa, gxb, rtol=rtol, atol=atol, msg=lambda m: f"input grad: {m}")
    for name, pa, pb, transform in pairs:
        assert pa.grad is not None and pb.grad is not None, f"no grad for {name}"
        torch.testing.assert_close(pa.grad, transform(pb.grad), rtol=rtol, atol=atol,
                                   msg=lambda m: f"grad of {name}: {m}")


def same(t):
    return t
