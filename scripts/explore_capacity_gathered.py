"""Would capacity-factor (cf > 0) no-grad calls gain from the gathered Triton first GEMM that
dropless calls use? The first GEMM of the padded layout two ways, balanced routing, CUDA graphs
replayed in rotation (GPU time only):
  dispatch+bmm : the native dispatch into [E*C, D] (scatter_located_rows), then cuBLAS bmm with
                 relu in its epilogue (what the one-call native forward runs today);
  gathered     : the Triton row GEMM gathering each padded row's token itself (inverse of the
                 capacity slots, unfed rows reading token 0), every expert C rows, relu epilogue,
                 writing the same [E*C, H] layout (the second GEMM and combine are unchanged).
Prints ms per call and the largest difference over the fed rows.

    python scripts/explore_capacity_gathered.py [config ...]   # default: fine64 dsv3
"""
from __future__ import annotations

import statistics
import sys

import torch

from adaptmoe import ops
from adaptmoe.examples.bench_layer import CONFIGS, balance_routing, build_layer
from adaptmoe.examples.timing import time_call
from adaptmoe.ops import _native, _triton_gemm
from adaptmoe.routing import capacity_for


def graphed(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def run(name: str, iters: int = 60) -> None:
    cfg = CONFIGS[name]
    T, D, E, K = cfg["T"], cfg["D"], cfg["E"], cfg["K"]
    torch.manual_seed(0)
    layer = build_layer(cfg, "cuda")
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    balance_routing(layer, x, K)
    w1 = layer.experts.batched_fc1_w
    H = w1.shape[1]
    native = _native.loaded() or _native.for_tensor(x)
    C = capacity_for(1.0, T, E, K)
    with torch.no_grad():
        logits = layer.gates[0](x)
        _, _, _, _, counts, slots = ops.route_topk(logits, K, "softmax", True, C)
        inv = torch.zeros(E * C + 1, device="cuda", dtype=torch.int32)
        choice = torch.arange(T * K, device="cuda", dtype=torch.int32)
        inv.scatter_(0, torch.where(slots >= 0, slots, E * C).view(-1), choice)
        inv_cap = inv[: E * C]
        full = torch.full((E,), C, device="cuda", dtype=counts.dtype)

        def dispatch_bmm():
            x_RD = native.scatter_located_rows(x, slots, counts, C, None, False)
            return native.bmm_nt_act(x_RD.view(E, C, D), w1, None, 1, False)

        def gathered():
            return _triton_gemm.gathered_fc1_relu(x, inv_cap, K, full, w1, None)

        fed = torch.zeros(E * C, device="cuda", dtype=torch.bool)
        fed[slots[slots >= 0]] = True
        a, b = dispatch_bmm().view(E * C, H), gathered()
        diff = (a[fed].float() - b[fed].float()).abs().max().item()
        graphs = {"dispatch+bmm": graphed(dispatch_bmm)[0], "gathered": graphed(gathered)[0]}
        names = list(graphs)
        samples = {n: [] for n in names}
        for i in range(iters):
            for j in range(len(names)):
                n = names[(i + j) % len(names)]
                samples[n].append(time_call(graphs[n].replay, "cuda"))
    cells = "  ".join(f"{n} {statistics.median(s):.3f} ms" for n, s in samples.items())
    print(f"{name:<8} T={T} D={D} H={H} E={E} K={K} C={C}  {cells}  max |diff| on fed rows {diff:.3g}", flush=True)


def main() -> None:
    print(f"device: {torch.cuda.get_device_name()} | torch {torch.__version__}")
    for name in sys.argv[1:] or ["fine64", "dsv3"]:
        run(name)


if __name__ == "__main__":
    main()
