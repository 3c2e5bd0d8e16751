"""Where an isolated no-grad forward of a single-GPU layer loses time against its CUDA graph:
the same call cut at each layer of Python around the one native call, each timed alone on an
idle GPU (CUDA events), plus the host time of each cut in a warm loop and host stamps of the
full call.

    python scripts/isolated_native_call.py [config ...] [--dropless]   # default: fine64 readme_bf16

Rows (us): layer = MoELayer.forward as users call it; repeat = native_forward.repeat, the short
way of the layer's later calls, called directly; run = native_forward.run with knobs and
plan made beforehand (no knob checks, flattening, losses, output packaging); launch =
native_forward._launch with the gate and weights read beforehand; native_pack = the extension's
call with prebuilt arguments, its outputs packaged as _launch does; native = that call alone; floor = two bmms with relu between (bench_layer's floor);
graphed = the layer replayed from a CUDA graph; layer_drop = the layer with its kept outputs
(l_aux, losses, last_routing) dropped after each call. Isolated times: the cuts in a rotating
order per round (before 2026-11-23 one cut after another: the first ran in other clocks).
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from adaptmoe import native_forward
from adaptmoe.examples.bench_layer import CONFIGS, balance_routing, build_layer
from adaptmoe.examples.timing import capture_no_grad, time_call
from adaptmoe.layer import MoELayer
from adaptmoe.ops import _native
from scripts.host_costs import host_us
from scripts.isolated_call_events import stamped_calls


def _capacity(layer, x_TD, knobs):
    from adaptmoe.routing import capacity_for
    return capacity_for(knobs.capacity_factor, x_TD.shape[0], layer.config.num_experts, knobs.top_k)


def _native_call(layer, x_TD, knobs, plan):
    T, k, cap = x_TD.shape[0], knobs.top_k, _capacity(layer, x_TD, knobs)
    gate, w = layer.gates[0], layer.experts.stored_weights()
    args = (x_TD, gate.wg.weight, gate.fp32, k, plan.score_fn, plan.normalize, -1 if cap is None else cap,
            layer.config.is_postscore, plan.grouped, w.w1_eHD, w.w2_eHO, w.w3_eHD, w.b1_eH, w.b2_eO,
            plan.activation, plan.relu_epilogue, False, plan.gshard_loss,
            plan.dense and (cap is None or cap >= T))
    native = _native.loaded()
    return lambda: native.moe_forward_nograd(*args)


def _packed_native_call(layer, x_TD, knobs, plan):
    """_native_call with its outputs packaged as native_forward._launch packages them."""
    cap, call = _capacity(layer, x_TD, knobs), _native_call(layer, x_TD, knobs, plan)
    rows = native_forward._routed_rows(x_TD.shape[0], knobs.top_k, layer.config.num_experts, cap)
    return lambda: native_forward._packaged(call(), cap, rows, plan)


def stamps(layer, x, cf: float, calls: int = 40) -> dict[str, float]:
    """perf_counter at entry (>) and exit (<) of each piece of the call, medians in us."""
    marks: list[tuple[str, float]] = []
    targets = [(MoELayer, "_memo_key", "memo_key"), (native_forward, "repeat", "repeat"),
               (native_forward, "_launch", "launch"), (native_forward, "_packaged", "packaged"),
               (MoELayer, "_finish", "finish")]
    runs: dict[str, list[float]] = {}
    with stamped_calls(targets, marks):
        for i in range(calls + 5):
            torch.cuda.synchronize()
            marks.clear()
            t0 = time.perf_counter()
            layer(x, capacity_factor=cf)
            marks.append(("return", time.perf_counter()))
            if i >= 5:
                for label, t in marks:
                    runs.setdefault(label, []).append((t - t0) * 1e6)
    return {label: statistics.median(v) for label, v in runs.items()}


def interleaved_us(fns: dict, iters: int) -> dict[str, float]:
    """Median us of each isolated call (CUDA events, a sync after each), the cuts taken in a rotating
    order per round so that clock drift hits them alike."""
    names = list(fns)
    for fn in fns.values():
        for _ in range(5):
            fn()
    times = {n: [] for n in names}
    for i in range(iters):
        for j in range(len(names)):
            n = names[(i + j) % len(names)]
            times[n].append(time_call(fns[n], "cuda") * 1e3)
    return {n: statistics.median(v) for n, v in times.items()}


def run_config(name: str, cf: float, iters: int = 100) -> None:
    cfg = CONFIGS[name]
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
    balance_routing(layer, x, cfg["K"])
    w1, w2 = layer.experts.batched_fc1_w, layer.experts.batched_fc2_w
    E, K, T = cfg["E"], cfg["K"], cfg["T"]
    xf = torch.randn(E, T * K // E, cfg["D"], device="cuda", dtype=x.dtype)
    with torch.no_grad():
        knobs = layer.resolve_knobs(capacity_factor=cf)
        plan = native_forward.plan_for(layer, x, knobs)
        assert plan is not None, native_forward.native_forward_blocker(layer, x, knobs)
        layer(x, capacity_factor=cf)   # remembers the call: later ones take the repeat path
        call = next(iter(layer.__dict__["_repeat_calls"].values()))
        gate, wg_ED, weights = call.gate, call.wg_ED, call.weights
        fns = {
            "layer": lambda: layer(x, capacity_factor=cf),
            "repeat": lambda: native_forward.repeat(layer, call, x),
            "run": lambda: native_forward.run(layer, x, knobs, plan),
            "native": _native_call(layer, x, knobs, plan),
            "native_pack": _packed_native_call(layer, x, knobs, plan),
            "launch": lambda: native_forward._launch(layer, x, knobs, plan, gate, wg_ED, weights),
            "floor": lambda: torch.bmm(torch.relu(torch.bmm(xf, w1.transpose(1, 2))), w2),
            # the layer without keeping its outputs (l_aux, losses, last_routing) until the next call
            "layer_drop": lambda: (layer(x, capacity_factor=cf), [layer.__dict__.pop(n, None)
                                                                  for n in ("l_aux", "losses", "last_routing")]),
        }
        t_end = time.perf_counter() + 2.0
        while time.perf_counter() < t_end:   # clocks up
            for fn in fns.values():
                fn()
            torch.cuda.synchronize()
        graph, _ = capture_no_grad(lambda: layer(x, capacity_factor=cf))
        fns["graphed"] = graph.replay
        iso = interleaved_us(fns, iters)
        host = {k: host_us(fn, reps=20, inner=4) for k, fn in fns.items()}
        st = stamps(layer, x, cf)
    mode = "dropless" if cf == 0 else f"cf={cf:g}"
    print(f"=== {name} {mode}: isolated call (us, CUDA events) and host time per call (us, warm loop)")
    for k in iso:
        print(f"  {k:<8} isolated {iso[k]:8.1f}   host {host[k]:7.1f}   vs graphed {iso[k] - iso['graphed']:+7.1f}")
    print(f"=== {name} {mode}: host stamps of isolated layer calls (us from the call, medians)")
    for label, t in sorted(st.items(), key=lambda kv: kv[1]):
        print(f"  {label:<14} {t:8.1f}")


def main() -> None:
    args = sys.argv[1:]
    names = [a for a in args if not a.startswith("--")] or ["fine64", "readme_bf16"]
    cfs = [1.0, 0.0] if "--dropless" in args else [1.0]
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    for name in names:
        for cf in cfs:
            run_config(name, cf)


if __name__ == "__main__":
    main()
