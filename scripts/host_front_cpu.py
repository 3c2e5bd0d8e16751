"""Host time of the Python around a layer's repeat call, on any CPU: the README layer (small
shapes) called as users call it, its native call replaced by a stub returning ready outputs, so
only the Python runs. A CPU proxy for the Python in front of the native launch of an isolated
call (the GPU waits for it), and a per-piece breakdown (us per call, warm loop).

    python scripts/host_front_cpu.py
"""
from __future__ import annotations

import statistics
import time
import types

import torch

from adaptmoe import native_forward
from adaptmoe.examples.bench_layer import CONFIGS, build_layer
from adaptmoe.ops import _native

CF = 1.0
# forward's knob arguments as a call with only capacity_factor passes them (MoELayer.forward's order)
FORWARD_ARGS = (0, None, CF, None, None, None, None, None, 1, False)


def per_call_us(fn, calls: int = 20000, reps: int = 7) -> float:
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        samples.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(samples)


def stubbed_layer():
    """(layer, x, its remembered call, the stub's outputs): the layer with a RepeatCall for
    FORWARD_ARGS, and the extension replaced by a stub (restored by the caller)."""
    cfg = dict(CONFIGS["readme_bf16"], T=64, D=64, H=64)
    layer = build_layer(cfg, "cpu").eval()
    x = torch.randn(cfg["T"], cfg["D"], dtype=torch.bfloat16)
    outs = [torch.zeros_like(x)] + [torch.zeros(1) for _ in range(8)]
    _native._module, _native._tried = types.SimpleNamespace(moe_forward_nograd=lambda *args: outs), True
    knobs = layer.resolve_knobs(capacity_factor=CF)
    plan = native_forward.NativeForwardPlan(score_fn=0, normalize=True, activation=1, relu_epilogue=True,
                                            grouped=False, gshard_loss=True, dense=True)
    call = native_forward.RepeatCall(layer, x, knobs, plan)
    layer._memo_put("_repeat_calls", layer._memo_key(FORWARD_ARGS), call)
    return layer, x, call, outs


def main() -> None:
    saved = _native._module, _native._tried
    try:
        with torch.no_grad():
            layer, x, call, outs = stubbed_layer()
            assert layer(x, capacity_factor=CF) is outs[0], "the call did not take the repeat path"
            result = native_forward.repeat(layer, call, x)
            key = layer._memo_key(FORWARD_ARGS)
            rows = {
                "layer(x, capacity_factor)": lambda: layer(x, capacity_factor=CF),
                "layer.forward (no nn.Module call)": lambda: layer.forward(x, capacity_factor=CF),
                "native_forward.repeat": lambda: native_forward.repeat(layer, call, x),
                "native_forward._launch": lambda: native_forward._launch(layer, x, call.knobs, call.plan, call.gate,
                                                                         call.wg_ED, call.weights),
                "MoELayer._finish": lambda: layer._finish(x, x, (x.shape[0],), 1, call.knobs, *result, None),
                "MoELayer._memo_key": lambda: layer._memo_key(FORWARD_ARGS),
                "MoELayer._memo_get": lambda: layer._memo_get("_repeat_calls", key),
                "RepeatCall.modules_unchanged": lambda: call.modules_unchanged(layer),
                "torch.is_autocast_enabled('cuda')": lambda: torch.is_autocast_enabled("cuda"),
                "torch.compiler.is_compiling()": torch.compiler.is_compiling,
                "empty lambda": lambda: None,
            }
            for name, fn in rows.items():
                print(f"{name:<36} {per_call_us(fn):6.2f} us")
    finally:
        _native._module, _native._tried = saved


if __name__ == "__main__":
    main()
