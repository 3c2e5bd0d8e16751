"""Which call invalidates a CUDA-graph capture of a training step when the gshard loss runs in the
native kernels (native/NOTES.md, tenth session): the capture status around each stage of the
layer's forward and backward while torch.cuda.make_graphed_callables captures it.

    python scripts/debug_capture_gshard.py [--cf 1.0 0.0]   # several: one after the other, one process
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

import adaptmoe as am
from adaptmoe import dispatch, executor, ops
from adaptmoe.ops import _ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from graph_replay import WithAux, eager_step_then_forget  # noqa: E402   (the GPU test's own setup)


def status() -> str:
    if not torch.cuda.is_available():
        return "-"
    stream = torch.cuda.current_stream()
    # cudaStreamIsCapturing through torch: True only while the capture is active (not invalidated)
    return "capturing" if torch.cuda.is_current_stream_capturing() else f"not capturing (stream {stream.cuda_stream})"


def traced(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        before = status()
        out = fn(*args, **kwargs)
        print(f"  {name:<28} before: {before:<40} after: {status()}", flush=True)
        return out
    return wrapper


def gshard_anywhere(scores_TE, indices_TK):
    """gshard_loss_native without its capture exclusion."""
    if scores_TE.shape[0] == 0:
        return None
    return _ops._GshardLossFunction.apply(scores_TE, indices_TK)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cf", type=float, nargs="+", default=[0.0])
    args = ap.parse_args()
    ops.gshard_loss_native = traced("gshard_loss_native", gshard_anywhere)
    for module, name in ((ops, "route_topk"), (dispatch, "dispatch"), (dispatch, "combine"),
                         (executor, "run_experts_local")):
        if hasattr(module, name):
            setattr(module, name, traced(name, getattr(module, name)))
    for cf in args.cf:
        print(f"=== cf={cf}", flush=True)
        capture_training_step(cf)


def capture_training_step(cf: float) -> None:
    torch.manual_seed(0)
    cfg = am.MoEConfig(model_dim=64, num_experts=4, gate=am.GateConfig(top_k=2, capacity_factor=cf),
                       experts=am.ExpertConfig(hidden_size=96))
    layer = am.MoELayer(cfg).to(device="cuda")
    module = WithAux(layer)
    x = torch.randn(96, 64, device="cuda", requires_grad=True)
    print("eager step", flush=True)
    eager_step_then_forget(module, x)
    print("make_graphed_callables (warmup, then capture)", flush=True)
    try:
        torch.cuda.make_graphed_callables(module, (x,))
        print("captured")
    except Exception as err:   # the point of the script: report, then stop
        print(f"failed: {type(err).__name__}: {str(err)[:300]}")


if __name__ == "__main__":
    main()
