"""Exploration on the GPU (numbers for native/NOTES.md, not a product path):
1. expert GEMMs: cuBLAS bmm vs torch._grouped_mm with each operand layout, forward and the
   weight-gradient forms, at the bench_layer shapes (balanced rows per expert);
2. whether a row gather (the dispatch's traffic) overlaps the expert GEMMs when both are split
   by expert groups on two streams.

    python scripts/explore_gemm.py
"""
from __future__ import annotations

import torch

from adaptmoe.examples.timing import median_ms

SHAPES = {  # name: (E, rows per expert, D, H)
    "fine64": (64, 1024, 2048, 1024),
    "dsv3": (256, 512, 7168, 2048),
    "mixtral": (8, 4096, 4096, 14336),
    "readme": (2, 8192, 2048, 2048),
}


def ms(fn) -> float:
    return median_ms(fn, "cuda", iters=30, warmup=5)


def gemms(name, E, C, D, H):
    bf = torch.bfloat16
    dev = "cuda"
    x = torch.randn(E, C, D, device=dev, dtype=bf)
    h = torch.randn(E, C, H, device=dev, dtype=bf)
    w1 = torch.randn(E, H, D, device=dev, dtype=bf) * 0.02      # nn.Linear layout
    w1t = w1.transpose(1, 2).contiguous()                        # [E, D, H]
    w2 = torch.randn(E, H, D, device=dev, dtype=bf) * 0.02      # [E, H, O]
    w2t = w2.transpose(1, 2).contiguous()                        # [E, O, H]
    xR, hR = x.view(E * C, D), h.view(E * C, H)
    offs = torch.arange(1, E + 1, device=dev, dtype=torch.int32) * C
    gy = torch.randn(E * C, D, device=dev, dtype=bf)
    gh = torch.randn(E * C, H, device=dev, dtype=bf)
    rows = {
        "fc1 bmm NT": lambda: torch.bmm(x, w1.transpose(1, 2)),
        "fc1 bmm NN (w1t)": lambda: torch.bmm(x, w1t),
        "fc1 gmm B col-major": lambda: torch._grouped_mm(xR, w1.transpose(1, 2), offs=offs),
        "fc1 gmm B row-major": lambda: torch._grouped_mm(xR, w1t, offs=offs),
        "fc2 bmm NN": lambda: torch.bmm(h, w2),
        "fc2 gmm B row-major": lambda: torch._grouped_mm(hR, w2, offs=offs),
        "fc2 gmm B col-major": lambda: torch._grouped_mm(hR, w2t.transpose(1, 2), offs=offs),
        "dW2 bmm (h^T gy)": lambda: torch.bmm(h.transpose(1, 2), gy.view(E, C, D)),
        "dW2 gmm ragged-K": lambda: torch._grouped_mm(hR.t(), gy, offs=offs),
        "dW1 bmm (gh^T x)": lambda: torch.bmm(gh.view(E, C, H).transpose(1, 2), x),
        "dW1 gmm ragged-K": lambda: torch._grouped_mm(gh.t(), xR, offs=offs),
        "dX gmm (gh w1)": lambda: torch._grouped_mm(gh, w1, offs=offs),
        "dX bmm (gh w1)": lambda: torch.bmm(gh.view(E, C, H), w1),
    }
    for label, fn in rows.items():
        try:
            t = ms(fn)
            tf = 2 * E * C * D * H / t / 1e9
            print(f"{name:<8} {label:<22} {t:8.3f} ms {tf:7.1f} TF/s")
        except Exception as exc:  # noqa: BLE001 - exploration: report and go on
            print(f"{name:<8} {label:<22} failed: {type(exc).__name__}: {str(exc)[:120]}")


def overlap(name, E, C, D, H, K=8, groups=(1, 2, 4, 8)):
    bf = torch.bfloat16
    dev = "cuda"
    T = E * C // K
    x_TD = torch.randn(T, D, device=dev, dtype=bf)
    src_R = torch.randint(0, T, (E * C,), device=dev)
    w1 = torch.randn(E, H, D, device=dev, dtype=bf) * 0.02
    w2 = torch.randn(E, H, D, device=dev, dtype=bf) * 0.02
    x_RD = torch.empty(E * C, D, device=dev, dtype=bf)
    side = torch.cuda.Stream()

    def run(G):
        eg = E // G
        main = torch.cuda.current_stream()
        side.wait_stream(main)
        events = []
        with torch.cuda.stream(side):
            for g in range(G):
                rows = slice(g * eg * C, (g + 1) * eg * C)
                torch.index_select(x_TD, 0, src_R[rows], out=x_RD[rows])
                ev = torch.cuda.Event()
                ev.record(side)
                events.append(ev)
        outs = []
        for g in range(G):
            main.wait_event(events[g])
            xg = x_RD[g * eg * C:(g + 1) * eg * C].view(eg, C, D)
            hg = torch.relu(torch.bmm(xg, w1[g * eg:(g + 1) * eg].transpose(1, 2)))
            outs.append(torch.bmm(hg, w2[g * eg:(g + 1) * eg]))
        main.wait_stream(side)
        return outs

    def serial():
        torch.index_select(x_TD, 0, src_R, out=x_RD)
        h = torch.relu(torch.bmm(x_RD.view(E, C, D), w1.transpose(1, 2)))
        return torch.bmm(h, w2)

    gather_only = ms(lambda: torch.index_select(x_TD, 0, src_R, out=x_RD))
    print(f"{name:<8} gather alone {gather_only:.3f} ms; serial gather+ffn {ms(serial):.3f} ms")
    for G in groups:
        if E % G == 0:
            print(f"{name:<8} pipelined over {G} expert groups: {ms(lambda: run(G)):.3f} ms")


def main():
    print(torch.cuda.get_device_name(), torch.__version__)
    for name, (E, C, D, H) in SHAPES.items():
        gemms(name, E, C, D, H)
    for name in ("fine64", "dsv3"):
        E, C, D, H = SHAPES[name]
        overlap(name, E, C, D, H)


if __name__ == "__main__":
    main()
