"""A few no-grad forwards of one bench_layer config, for Nsight Compute on its small kernels:

    ncu --kernel-name regex:"topk|gshard|hist|locate|scan_hist" --launch-skip 8 --launch-count 8 \
        --section SpeedOfLight --section Occupancy --section LaunchStats \
        python scripts/ncu_small_kernels.py fine64 [cf]
"""
from __future__ import annotations

import sys

import torch

from adaptmoe.examples.bench_layer import CONFIGS, balance_routing, build_layer


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "fine64"
    cf = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    cfg = CONFIGS[name]
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=layer.experts.batched_fc1_w.dtype)
    balance_routing(layer, x, cfg["K"])
    with torch.no_grad():
        for _ in range(6):
            layer(x, capacity_factor=cf)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
