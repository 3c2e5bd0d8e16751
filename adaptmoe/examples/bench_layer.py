"""Single-GPU MoE layer benchmark: fwd and fwd+bwd against the expert-compute floor of the same run.

    python -m adaptmoe.examples.bench_layer [--configs mixtral,fine64,dsv3,readme_fp32,readme_bf16]
                                            [--quick] [--profile CONFIG] [--iters N]

Legend: T tokens, D model dim, H expert hidden, E experts, K top-k.
Experts: 2-matrix FFN, relu, no biases (so the floor, two balanced batched matmuls with T*K/E
rows per expert, does the same arithmetic). Gate: softmax top-k, k weights renormalised, the
layer's default (bf16 gate for bf16 models), gshard loss included in the backward.
Rows per config and capacity mode (cf=1 and dropless):
  layer : adaptmoe.MoELayer.forward as users call it (a no_grad forward on one GPU runs as one
          native call: adaptmoe.native_forward).
  layer_python : the same layer with that one-call native forward turned off (gate, routing,
          dispatch, experts and combine enqueued op by op from Python); fwd only (an A/B row).
  fused : the same layer's parameters through adaptmoe.ops.route_topk (fused gating + top-k +
          slot assignment) -> ops.dispatch -> experts -> ops.combine; what the layer reaches once
          its routing uses the fused op.
  layer_unfused : the layer with the relu-in-epilogue first GEMM turned off (bmm, relu, bmm;
          an A/B row for adaptmoe.ops._fused_gemm, same run, same floor).
  graphed : the layer's forward captured once in a CUDA graph and replayed (no host work per
          call: what the GPU alone takes, as serving with graphs sees it); fwd only.
  compiled : torch.compile(layer, mode="reduce-overhead", fullgraph=True), no_grad forward (inductor
          plus CUDA graphs, the stock way to drop per-call host time at fixed shapes); fwd only.
Routing: --routing random (default) keeps the gate's random initialisation (uneven counts: cf=1
drops overflow, dropless computes it); --routing balanced sets the gate to read the first E input
features and writes them so that every expert receives exactly T*K/E tokens (cf=1 then drops
nothing and both capacity modes compute the same rows: the issue's "dropless vs cf=1 on balanced
routing" comparison).
Timing: CUDA events around each call, warmup, median of --iters (>= 50 unless --quick); each
call starts on an idle GPU (isolated: host time not covered by GPU work shows). "pipe" columns:
the same no_grad forward enqueued 20 calls back to back, time per call (median of >= 5 such
batches): the host runs ahead as in a model, hiding per-call host time shorter than the GPU's.
fwd is timed under no_grad; fwd+bwd with grads for x and all parameters. TFLOP/s counts
4*T*K*D*H per forward (x3 for fwd+bwd). Ratio = time / floor (fwd floor; 3x it for fwd+bwd).
"""
from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from adaptmoe import native_forward
from adaptmoe.examples.timing import capture_no_grad, median_ms, pipelined_ms
from adaptmoe.ops import _fused_gemm

CONFIGS = {
    "mixtral": dict(T=8192, D=4096, H=14336, E=8, K=2, dtype="bf16"),
    "fine64": dict(T=8192, D=2048, H=1024, E=64, K=8, dtype="bf16"),
    "dsv3": dict(T=16384, D=7168, H=2048, E=256, K=8, dtype="bf16"),
    "readme_fp32": dict(T=8192, D=2048, H=2048, E=2, K=2, dtype="fp32"),
    "readme_bf16": dict(T=8192, D=2048, H=2048, E=2, K=2, dtype="bf16"),
}
PATHS = ("layer", "fused", "layer_unfused", "layer_python", "graphed", "compiled")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class Row:
    config: str
    mode: str
    path: str
    fwd_ms: float
    fwdbwd_ms: float
    peak_gib: float
    pipe_ms: float = float("nan")   # fwd per call when calls are enqueued back to back


def _git_commit() -> str:
    import os
    if os.environ.get("ADAPTMOE_COMMIT"):  # the device machine gets the tree without .git
        return os.environ["ADAPTMOE_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return (out.stdout.strip() or "unknown") + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def build_layer(cfg: dict, device: str):
    from adaptmoe import ExpertConfig, GateConfig, MoEConfig, MoELayer
    config = MoEConfig(model_dim=cfg["D"], num_experts=cfg["E"],
                       gate=GateConfig(kind="softmax", top_k=cfg["K"], capacity_factor=1.0, losses=("gshard",)),
                       experts=ExpertConfig(kind="ffn", hidden_size=cfg["H"], activation="relu",
                                            has_fc1_bias=False, has_fc2_bias=False))
    return MoELayer(config).to(device=device, dtype=DTYPES[cfg["dtype"]])


def fused_forward(layer, x_TD: torch.Tensor, k: int, cf: float) -> torch.Tensor:
    """The layer's parameters through the fused native path (see the module docstring)."""
    from adaptmoe import ops
    from adaptmoe.routing import capacity_for
    T, D = x_TD.shape
    E = layer.config.num_experts
    logits_TE = layer.gates[0](x_TD)
    capacity = capacity_for(cf, T, E, k)
    idx_TK, w_TK, scores_TE, _, counts_E, slots_TK = ops.route_topk(logits_TE, k, "softmax", True, capacity)
    num_rows = T * k if capacity is None else E * capacity
    x_RD = ops.dispatch(x_TD, slots_TK, num_rows)
    if capacity is None:
        y_RD = layer.experts.forward_grouped(x_RD, counts_E, max_rows_per_expert=T)
    else:
        y_RD = layer.experts(x_RD.view(E, capacity, D)).reshape(num_rows, -1)
    y_TD = ops.combine(y_RD, slots_TK, w_TK)
    top1_E = torch.zeros(E, device=x_TD.device).scatter_add_(0, idx_TK[:, 0], torch.ones(T, device=x_TD.device))
    y_TD.l_aux = E * torch.sum(scores_TE.float().mean(0) * top1_E / max(T, 1))
    return y_TD


def balance_routing(layer, x_TD: torch.Tensor, k: int) -> None:
    """Gate logits become 8 * x[:, :E]; token t gets +1 on experts (t*k + j) mod E, j < k, and -1
    elsewhere, so its top-k are exactly those and every expert receives T*k/E tokens."""
    T, E = x_TD.shape[0], layer.config.num_experts
    with torch.no_grad():
        wg = layer.gates[0].wg.weight
        wg.zero_()
        wg[:, :E] = 8 * torch.eye(E, device=wg.device, dtype=wg.dtype)
        chosen_TK = (torch.arange(T, device=x_TD.device).unsqueeze(1) * k + torch.arange(k, device=x_TD.device)) % E
        x_TD[:, :E] = -1.0
        x_TD[:, :E].scatter_(1, chosen_TK, 1.0)


def graphed_forward_ms(layer, x_TD: torch.Tensor, cf: float, iters: int, warmup: int) -> float:
    graph, _ = capture_no_grad(lambda: layer(x_TD, capacity_factor=cf), warmup=3)
    ms = median_ms(graph.replay, "cuda", iters, warmup)
    del graph
    # cuBLAS keeps a workspace per (handle, stream) for the process's life: the side stream's
    # would count in the peak memory of every row measured after this one.
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    return ms


def compiled_forward_ms(layer, x_TD: torch.Tensor, cf: float, iters: int, warmup: int) -> float:
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)

    def fwd():
        with torch.no_grad():
            return compiled(x_TD, capacity_factor=cf)
    for _ in range(3):   # compile, then the warmup calls CUDA graph trees record before replaying
        fwd()
    ms = median_ms(fwd, "cuda", iters, warmup)
    del compiled
    torch._dynamo.reset()   # frees the graphs (and their memory pool) before the next rows
    return ms


def measure(name: str, cfg: dict, iters: int, warmup: int, paths: list[str], profile: bool,
            routing: str = "random") -> tuple[float, list[Row]]:
    # Memory still held from earlier configs (graph pools, cuBLAS per-stream workspaces) is not
    # this config's: peaks are counted from here.
    gc.collect()
    base_bytes = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    layer = build_layer(cfg, "cuda")
    x = torch.randn(cfg["T"], cfg["D"], device="cuda", dtype=DTYPES[cfg["dtype"]])
    if routing == "balanced":
        balance_routing(layer, x, cfg["K"])
    floor_ms = _burn_in_and_floor_ms(layer, x, cfg, iters, warmup)
    rows = []
    for path in paths:
        _fused_gemm.set_enabled(path != "layer_unfused")
        for mode, cf in (("cf=1", 1.0), ("dropless", 0.0)):
            if path in ("graphed", "compiled"):
                nan = float("nan")
                ms = (graphed_forward_ms(layer, x, cf, iters, warmup) if path == "graphed"
                      else compiled_forward_ms(layer, x, cf, iters, warmup))
                rows.append(Row(name, mode, path, ms, nan, nan))
            else:
                rows.append(_eager_row(name, mode, path, layer, x, cf, cfg["K"], iters, warmup, base_bytes, profile))
    _fused_gemm.set_enabled(True)
    del layer, x
    torch.cuda.empty_cache()
    return floor_ms, rows


def _burn_in_and_floor_ms(layer, x: torch.Tensor, cfg: dict, iters: int, warmup: int) -> float:
    """The floor of the same run: two balanced batched matmuls at T*K/E rows per expert with the
    relu between them, on the layer's own weights, timed after a burn-in of both."""
    T, D, E, K = cfg["T"], cfg["D"], cfg["E"], cfg["K"]
    w1_EHD, w2_EHD = layer.experts.batched_fc1_w, layer.experts.batched_fc2_w
    xf = torch.randn(E, T * K // E, D, device=x.device, dtype=x.dtype)

    def floor():
        with torch.no_grad():
            torch.bmm(torch.relu(torch.bmm(xf, w1_EHD.transpose(1, 2))), w2_EHD)

    # Burn-in for >= 2 s: the first rows measured in a process ran up to 15% slow (clocks ramping;
    # 30 calls were not enough for Mixtral's first row).
    burn_start = time.perf_counter()
    while time.perf_counter() - burn_start < 2.0:
        for _ in range(10):
            floor()
            layer(x)
        torch.cuda.synchronize()
    return median_ms(floor, "cuda", iters, warmup)


def _eager_row(name: str, mode: str, path: str, layer, x: torch.Tensor, cf: float, K: int, iters: int, warmup: int,
               base_bytes: int, profile: bool) -> Row:
    """An eagerly called path: fwd (isolated and pipelined) under no_grad, then fwd+bwd and its peak
    memory (layer_python: fwd only, its backward is layer's)."""
    x_in = x

    def fwd():
        if path in ("layer", "layer_unfused", "layer_python"):
            return layer(x_in, capacity_factor=cf)
        return fused_forward(layer, x_in, K, cf)

    native_forward.set_enabled(path != "layer_python")
    with torch.no_grad():
        fwd_ms = median_ms(fwd, "cuda", iters, warmup)
        pipe_ms = pipelined_ms(fwd, calls=20, reps=max(iters // 10, 5))
    native_forward.set_enabled(True)
    if path == "layer_python":
        return Row(name, mode, path, fwd_ms, float("nan"), float("nan"), pipe_ms)
    x_in = x.clone().requires_grad_(True)
    g = torch.randn_like(x)

    def step():
        y = fwd()
        torch.autograd.backward([y, y.l_aux], [g, torch.ones_like(y.l_aux)])
        for p in layer.parameters():
            p.grad = None
        x_in.grad = None

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base_bytes) / 2**30
    fb_ms = median_ms(step, "cuda", iters, warmup)
    if profile:
        def fwd_nograd():
            with torch.no_grad():
                fwd()
        _profile(fwd_nograd, f"{name} {mode} {path} fwd")
        _profile(step, f"{name} {mode} {path} fwd+bwd")
    return Row(name, mode, path, fwd_ms, fb_ms, peak, pipe_ms)


def _profile(step, title: str) -> None:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(f"\n--- profile: {title} (3 steps) ---")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {list(CONFIGS)}")
    ap.add_argument("--quick", action="store_true", help="10 timed iterations, 3 warmup (not for reporting)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--paths", default="layer,fused", help=f"comma list of {','.join(PATHS)}")
    ap.add_argument("--routing", default="random", choices=["random", "balanced"],
                    help="random: the gate's initialisation; balanced: every expert gets exactly T*K/E tokens")
    ap.add_argument("--profile", default="", help="comma list of configs to profile (torch.profiler)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_layer needs a CUDA GPU")
        return 1
    from adaptmoe import ops
    iters, warmup = (10, 3) if args.quick else (max(args.iters, 50), 10)
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        ap.error(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    paths = [p for p in args.paths.split(",") if p]
    bad_paths = [p for p in paths if p not in PATHS]
    if bad_paths:
        ap.error(f"unknown paths {bad_paths}; known: {list(PATHS)}")
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__} (CUDA {torch.version.cuda}) | "
          f"commit {_git_commit()} | native: {ops.native_status()} | median of {iters} after {warmup} warmup | "
          f"routing {args.routing}")
    results = []
    for name in names:
        cfg = CONFIGS[name]
        floor_ms, rows = measure(name, cfg, iters, warmup, paths, name in args.profile.split(","), args.routing)
        results.append((name, cfg, floor_ms, rows))
        _print_table([(name, cfg, floor_ms, rows)])
    print("\n=== summary ===")
    _print_table(results)
    return 0


def _print_table(results) -> None:
    hdr = (f"{'config':<12} {'dtype':<5} {'mode':<9} {'path':<13} {'fwd ms':>8} {'x floor':>8} {'fwd TF/s':>9} "
           f"{'f+b ms':>8} {'x 3floor':>8} {'f+b TF/s':>9} {'peak GiB':>9} {'floor ms':>9} {'pipe ms':>8} "
           f"{'x floor':>8}")
    print(hdr)
    for name, cfg, floor_ms, rows in results:
        flops = 4 * cfg["T"] * cfg["K"] * cfg["D"] * cfg["H"]
        for r in rows:
            print(f"{name:<12} {cfg['dtype']:<5} {r.mode:<9} {r.path:<13} {r.fwd_ms:8.3f} {r.fwd_ms / floor_ms:8.2f} "
                  f"{flops / r.fwd_ms / 1e9:9.1f} {r.fwdbwd_ms:8.3f} {r.fwdbwd_ms / (3 * floor_ms):8.2f} "
                  f"{3 * flops / r.fwdbwd_ms / 1e9:9.1f} {r.peak_gib:9.2f} {floor_ms:9.3f} {r.pipe_ms:8.3f} "
                  f"{r.pipe_ms / floor_ms:8.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
