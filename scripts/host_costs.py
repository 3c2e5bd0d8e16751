"""Host time of the single ops on a layer forward's path, on the GPU machine (us per call, launch
only: the GPU is synchronized every 8 calls so the launch queue never throttles the host).

    python scripts/host_costs.py
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from adaptmoe import native_forward, ops
from adaptmoe.examples.bench_layer import CONFIGS, build_layer
from adaptmoe.losses import gshard_loss
from adaptmoe.ops import _native


def host_us(fn, reps: int = 30, inner: int = 8) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples)


def main() -> None:
    bf = torch.bfloat16
    for name, T, D, E, K in (("fine64", 8192, 2048, 64, 8), ("readme", 8192, 2048, 2, 2)):
        x = torch.randn(T, D, device="cuda", dtype=bf)
        wg = torch.randn(E, D, device="cuda", dtype=bf)
        logits = F.linear(x, wg)
        idx, w, scores, _, counts, slots = ops.route_topk(logits, K, "softmax", True, K * T // E)
        native = _native.loaded()
        x_rows = ops.dispatch(x, slots, E * (K * T // E))
        w1 = torch.randn(E, 1024, D, device="cuda", dtype=bf)
        rows = {
            "F.linear (gate)": lambda: F.linear(x, wg),
            "torch.mm(x, wg.t())": lambda: torch.mm(x, wg.t()),
            "bmm_nt_act identity (gate)": lambda: native.bmm_nt_act(x.unsqueeze(0), wg.unsqueeze(0), None, 0, False),
            "ops.route_topk": lambda: ops.route_topk(logits, K, "softmax", True, K * T // E),
            "ops.dispatch": lambda: ops.dispatch(x, slots, E * (K * T // E)),
            "gshard_loss": lambda: gshard_loss(scores, idx),
            "x.reshape(-1, D)": lambda: x.reshape(-1, D),
            "x.to(same dtype)": lambda: x.to(bf),
            "torch.empty(T, D)": lambda: torch.empty(T, D, device="cuda", dtype=bf),
            "torch.is_grad_enabled()": torch.is_grad_enabled,
            "native.route_topk": lambda: native.route_topk(logits, K, 0, True, K * T // E, True),
            "native.scatter_rows": lambda: native.scatter_rows(x, slots, E * (K * T // E), None, None),
            "native.gather_rows": lambda: native.gather_rows(x_rows, slots, w, None),
            "torch.bmm (experts)": lambda: torch.bmm(x_rows.view(E, -1, D), w1.transpose(1, 2)),
            "native.bmm_nt_act relu": lambda: native.bmm_nt_act(x_rows.view(E, -1, D), w1, None, 1, False),
            **_layer_rows(name, x),
        }
        with torch.no_grad():
            for label, fn in rows.items():
                try:
                    print(f"{name:<7} {label:<28} {host_us(fn):7.1f} us")
                except RuntimeError as exc:
                    print(f"{name:<7} {label:<28} failed: {str(exc)[:100]}")


def _layer_rows(name: str, x: torch.Tensor) -> dict:
    """Host time of the layer's own pieces and of whole no-grad calls, native and Python paths."""
    layer = build_layer(CONFIGS["fine64" if name == "fine64" else "readme_bf16"], "cuda")
    knobs = layer.resolve_knobs()
    x_TD, _ = layer.flatten_input(x)
    with torch.no_grad():   # the native forward serves no-grad calls only
        plan = native_forward.plan_for(layer, x_TD, knobs)

    def python_call():
        native_forward.set_enabled(False)
        layer(x)
        native_forward.set_enabled(True)

    return {
        "layer.resolve_knobs()": layer.resolve_knobs,
        "layer.flatten_input(x)": lambda: layer.flatten_input(x),
        "native_forward.plan_for": lambda: native_forward.plan_for(layer, x_TD, knobs),
        "native_forward.run": lambda: native_forward.run(layer, x_TD, knobs, plan),
        "layer(x) native": lambda: layer(x),
        "layer(x) python": python_call,
    }


if __name__ == "__main__":
    main()
