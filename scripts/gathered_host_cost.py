"""Host time (warm loop, launch only) of the gathered Triton first GEMM and of whole dropless
no-grad layer calls with and without it, fine-grained layer at T=8192 and T=1024.

    python3 scripts/gathered_host_cost.py
"""
from __future__ import annotations

import torch

from adaptmoe import native_forward
from adaptmoe.examples.bench_layer import CONFIGS, build_layer
from adaptmoe.ops import _native, _triton_gemm
from scripts.host_costs import host_us


def main() -> None:
    for T in (8192, 1024):
        cfg = dict(CONFIGS["fine64"], T=T)
        layer = build_layer(cfg, "cuda")
        x = torch.randn(T, cfg["D"], device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            out = _native.load().moe_route_nograd(x, layer.gates[0].wg.weight, False, cfg["K"], 0, True, -1, -1)
            counts, inv = out[5], out[7]
            w1 = layer.experts.batched_fc1_w
            rows = {
                "triton gathered fc1 launch": lambda: _triton_gemm.gathered_fc1_relu(x, inv, cfg["K"], counts, w1, None),
                "native.moe_route_nograd": lambda: _native.loaded().moe_route_nograd(
                    x, layer.gates[0].wg.weight, False, cfg["K"], 0, True, -1, -1),
                "layer(x, cf=0) gathered": lambda: layer(x, capacity_factor=0.0),
            }
            for label, fn in rows.items():
                print(f"fine64 T={T:<5} {label:<30} {host_us(fn):7.1f} us", flush=True)
            native_forward.set_gathered_enabled(False)
            print(f"fine64 T={T:<5} {'layer(x, cf=0) one native call':<30} "
                  f"{host_us(lambda: layer(x, capacity_factor=0.0)):7.1f} us", flush=True)
            native_forward.set_gathered_enabled(True)


if __name__ == "__main__":
    main()
