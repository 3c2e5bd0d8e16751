"""Host time (device machine) of the slot path's pieces for dropless training: the layout, the
overflow read-back, each Triton fix-up launch with no overflow rows, and a plain bmm launch for
scale. Each piece: sync, then perf_counter around one call (the GPU idle, so nothing blocks),
median of 200.

    python3 scripts/host_cost_slots.py [fine64 dsv3]
"""
from __future__ import annotations

import sys

import torch

from adaptmoe.examples.bench_layer import CONFIGS
from adaptmoe.ops import _triton_gemm as tg
from adaptmoe.ops import _triton_slotted
from adaptmoe.routing import build_routing, capacity_for, overflow_slots
from scripts.host_costs import host_us


def run(name: str) -> None:
    cfg = CONFIGS[name]
    T, D, H, E, K = cfg["T"], cfg["D"], cfg["H"], cfg["E"], cfg["K"]
    dev, bf = "cuda", torch.bfloat16
    idx = (torch.arange(T, device=dev).unsqueeze(1) * K + torch.arange(K, device=dev)) % E
    routing = build_routing(idx, torch.ones(T, K, device=dev), E, 0.0)
    C = capacity_for(1.0, T, E, K)
    layout = overflow_slots(routing, C)
    x = torch.randn(E * C, D, device=dev, dtype=bf)
    w1 = torch.randn(E, H, D, device=dev, dtype=bf)
    g = torch.randn(E, H, D, device=dev, dtype=bf)
    h = torch.randn(E * C, H, device=dev, dtype=bf)
    monitor = _triton_slotted.OverflowMonitor()
    rows = {
        "overflow_slots (torch ops, reference)": lambda: overflow_slots(routing, C),
        "layout_on_gpu (one native launch)": lambda: _triton_slotted.layout_on_gpu(routing, C),
        "layout_on_gpu + monitor's count": lambda: (monitor.prefer_slots(E),
                                                    _triton_slotted.layout_on_gpu(routing, C, monitor)),
        "grouped_rows_mm fix-up (no rows)": lambda: tg.grouped_rows_mm(
            x, layout.over_E, w1, True, gather_R=layout.rows_O, top_k=1, out=h),
        "ragged_k_move (no rows)": lambda: tg.ragged_k_move(g, h, x, layout.rows_O, layout.hosted_E, layout.over_E),
        "torch.bmm launch, for scale": lambda: torch.bmm(x.view(E, C, D), w1.transpose(1, 2)),
        "slotted_bmm forward": lambda: _triton_slotted.slotted_bmm(x, w1, True, layout),
        "torch.empty (an ATen op, for scale)": lambda: torch.empty(E, device=dev),
    }
    print(f"\n{name}: host us per call (GPU idle before each)", flush=True)
    for label, fn in rows.items():
        print(f"  {label:<36} {host_us(fn, reps=200, inner=1):8.1f}", flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name())
    for name in sys.argv[1:] or ["fine64", "dsv3"]:
        run(name)
