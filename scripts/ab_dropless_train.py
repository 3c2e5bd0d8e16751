"""Interleaved A/B (device machine): one training step (forward + backward, gshard loss included)
of the layer, cf=1 against dropless in capacity slots (``ops._triton_slotted``, the default),
on grouped_mm, and on the Triton FFN (``ops._triton_ffn``) with each choice of kernels; also
cf=1 and slots with the relu outside the first GEMM (``ops._fused_gemm`` off).

    python3 scripts/ab_dropless_train.py [fine64 dsv3 mixtral ...] [--iters N] [--profile]
        [--routing balanced|random] [--variants "cf=1,cf=1 unfused relu,..."] [--min-gemm-work W]

Each round runs every variant once in a rotating order (CUDA events around each step, a sync
after it); medians over the rounds, and each variant's peak memory over one step (above what was
allocated before it: before 2026-11-23 the column included the inputs of the variants set up
earlier, +64 MiB per variant on fine-grained). Issue #3 asks
dropless to be within 5% of cf=1 on balanced routing.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from adaptmoe.examples.bench_layer import CONFIGS, DTYPES, balance_routing, build_layer
from adaptmoe.examples.timing import time_call
from adaptmoe.ops import _fused_gemm, _triton_ffn, _triton_native, _triton_slotted
from scripts.explore_triton_train import profile_steps

# label -> (capacity factor, slot path on, Triton FFN kernels: None off, "auto" for kernels_for,
# relu in the first GEMM's epilogue (ops._fused_gemm) on, Python's Triton launches through the
# extension once registered (ops._triton_native.RegisteredLaunches) on)
VARIANTS = {
    "cf=1": (1.0, False, None, True, True),
    "dropless slots (default)": (0.0, True, None, True, True),
    "dropless grouped_mm": (0.0, False, None, True, True),
    "dropless triton auto": (0.0, False, "auto", True, True),
    "dropless triton, dW grouped_mm": (0.0, False, _triton_ffn.FFNKernels("triton", "grouped_mm"), True, True),
    "cf=1 unfused relu": (1.0, False, None, False, True),
    "dropless slots unfused relu": (0.0, True, None, False, True),
    "dropless slots via Triton's launcher": (0.0, True, None, True, False),
}


def _step_fn(layer, x, cf: float, slots: bool, kernels, fused_relu: bool = True, native_launches: bool = True):
    x_in = x.clone().requires_grad_(True)
    g = torch.randn_like(x)
    auto = _triton_ffn.kernels_for

    def step():
        _triton_ffn.set_enabled(kernels is not None)
        _triton_slotted.set_enabled(slots)
        _fused_gemm.set_enabled(fused_relu)
        _triton_native.set_python_launches_native(native_launches)
        if kernels is not None and kernels != "auto":
            _triton_ffn.kernels_for = lambda *args: kernels
        try:
            y = layer(x_in, capacity_factor=cf)
            torch.autograd.backward([y, y.l_aux], [g, torch.ones_like(y.l_aux)])
        finally:
            _triton_ffn.kernels_for = auto
            _triton_ffn.set_enabled(False)
            _triton_slotted.set_enabled(True)
            _fused_gemm.set_enabled(True)
            _triton_native.set_python_launches_native(True)
        for p in layer.parameters():
            p.grad = None
        x_in.grad = None
    return step


def run(name: str, iters: int, profile: bool, routing: str, variants: list[str]) -> None:
    cfg = CONFIGS[name]
    torch.manual_seed(0)
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=DTYPES[cfg["dtype"]])
    if routing == "balanced":
        balance_routing(layer, x, cfg["K"])
    steps, peaks = {}, {}
    for label in variants:
        steps[label] = _step_fn(layer, x, *VARIANTS[label])
        for _ in range(3):
            steps[label]()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        held = torch.cuda.memory_allocated()   # the layer, and every variant's inputs made so far
        steps[label]()
        torch.cuda.synchronize()
        peaks[label] = (torch.cuda.max_memory_allocated() - held) / 2**30
    if profile:
        profile_steps({label: steps[label] for label in ("cf=1", "dropless slots (default)", "dropless grouped_mm")
                       if label in steps})
    samples = {label: [] for label in steps}
    labels = list(steps)
    for i in range(iters):
        for label in labels[i % len(labels):] + labels[:i % len(labels)]:
            samples[label].append(time_call(steps[label], "cuda"))
    medians = {label: statistics.median(v) for label, v in samples.items()}
    monitor = getattr(layer.experts, "_overflow_monitor", None)
    print(f"{name:<8} {routing} routing; fraction of experts the last measured call would fix up in slots: "
          f"{None if monitor is None else monitor.touched_fraction}", flush=True)
    for label, ms in medians.items():
        print(f"{name:<8} {label:<32} {ms:8.3f} ms  x cf=1 {ms / medians['cf=1']:.3f}  peak {peaks[label]:6.2f} GiB",
              flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="*", default=["fine64", "dsv3", "mixtral"])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--profile", action="store_true", help="GPU time per kernel of cf=1 and the dropless paths")
    ap.add_argument("--routing", choices=["balanced", "random"], default="balanced")
    ap.add_argument("--min-gemm-work", type=float, default=None,
                    help="override ops._triton_slotted.MIN_GEMM_WORK (0: the slot path at any size)")
    ap.add_argument("--variants", default=",".join(list(VARIANTS)[:5]),
                    help=f"comma-separated labels, cf=1 first (of: {', '.join(VARIANTS)})")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if variants[0] != "cf=1" or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: cf=1 first, then any of {list(VARIANTS)}")
    if args.min_gemm_work is not None:
        _triton_slotted.MIN_GEMM_WORK = args.min_gemm_work
    print(f"{torch.cuda.get_device_name()} | MIN_GEMM_WORK {_triton_slotted.MIN_GEMM_WORK:g}", flush=True)
    for name in args.configs:
        run(name, args.iters, args.profile, args.routing, variants)


if __name__ == "__main__":
    main()
