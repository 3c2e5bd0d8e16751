"""Python-level profile (cProfile) of training steps of a bench_layer config on the device machine:
which Python functions a step's host time goes to, per capacity mode (cf=1 or dropless; dropless
takes the slot path at any size here). cProfile slows every Python call, so read proportions.

    python3 scripts/profile_train_python.py [config] [--cf 0.0] [--steps 20] [--rows 35]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats

from adaptmoe.ops import _triton_slotted
from scripts.profile_train_host import training_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config", nargs="?", default="fine64")
    ap.add_argument("--cf", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=35)
    args = ap.parse_args()
    _triton_slotted.MIN_GEMM_WORK = 0
    step = training_step(args.config, args.cf, sync=True)

    for _ in range(5):
        step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    prof.disable()
    print(f"\n{args.config} cf={args.cf}: {args.steps} steps")
    stats = pstats.Stats(prof).strip_dirs()
    stats.sort_stats("tottime").print_stats(args.rows)
    stats.sort_stats("cumulative").print_stats(args.rows)


if __name__ == "__main__":
    main()
