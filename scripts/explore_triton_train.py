"""Exploration (device machine): the Triton grouped GEMMs of ``adaptmoe.ops._triton_gemm`` against
torch._grouped_mm and cuBLAS bmm, GEMM by GEMM and as a whole dropless training FFN.

    python3 scripts/explore_triton_train.py [fine64 dsv3 mixtral readme]
    python3 scripts/explore_triton_train.py --profile fine64    # kernel table of each whole FFN

Not product code: it picks tile shapes and answers "where do the Triton kernels beat grouped_mm?"
(issue #3). It supersedes the fifth session's ``explore_triton_grouped.py`` (gathered first GEMM
only; its log is ``h100_explore_triton_grouped.log``). Balanced routing (every expert T*K/E
rows, so bmm over [E, T*K/E] rows is the floor's own GEMM), bf16, GPU ms per call (CUDA events
around 20 back-to-back calls, median of 5). Per GEMM of a relu FFN:
  fc1  x w1^T (+relu; "gathered": rows read from the tokens, vs a gather + grouped_mm + relu)
  fc2  h w2   dH  gy w2^T (relu backward)   dX  gh w1
  dW1  gh^T x (ragged)  dW2  h^T gy (ragged)
then the whole FFN forward + backward: grouped_mm autograd vs the Triton autograd vs the padded
bmm path (cf=1 on balanced routing).

Legend: T tokens, D model dim, H hidden, E experts, K top-k, R = T*K grouped rows, C = R/E.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import triton

from adaptmoe.examples.timing import pipelined_ms
from adaptmoe.expert_compute import FFNWeights, ffn_grouped
from adaptmoe.ops import _triton_ffn
from adaptmoe.ops import _triton_gemm as tg

CONFIGS = {
    "fine64": dict(T=8192, D=2048, H=1024, E=64, K=8),
    "dsv3": dict(T=16384, D=7168, H=2048, E=256, K=8),
    "mixtral": dict(T=8192, D=4096, H=14336, E=8, K=2),
    "readme": dict(T=8192, D=2048, H=2048, E=2, K=2),
}
ROWS_TILES = [tg.Tiles(128, 256, 64, 8, 4), tg.Tiles(128, 256, 64, 8, 3), tg.Tiles(256, 128, 64, 8, 4)]
RAGGED_TILES = [tg.Tiles(128, 256, 64, 8, 4), tg.Tiles(128, 128, 64, 8, 4), tg.Tiles(256, 128, 64, 8, 4)]
KERNEL_CHOICES = [_triton_ffn.FFNKernels(plain, grads) for plain in ("triton", "grouped_mm")
                  for grads in ("triton", "grouped_mm")]


def _row(label: str, ms: float, flops: float, err: float | None = None) -> None:
    extra = "" if err is None else f"   max|diff| {err:.3g}"
    print(f"  {label:<44} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TF/s{extra}", flush=True)


def _best(label: str, candidates, fn_of_tiles, flops: float, want: torch.Tensor) -> None:
    for tiles in candidates:
        try:
            err = (fn_of_tiles(tiles).float() - want).abs().max().item()
            _row(f"{label} {tuple(tiles)}", pipelined_ms(lambda t=tiles: fn_of_tiles(t)), flops, err)
        except Exception as exc:   # an exploration: report and go on
            print(f"  {label} {tuple(tiles)} failed: {str(exc)[:160]}", flush=True)


def gemms(name: str, T: int, D: int, H: int, E: int, K: int) -> None:
    dev, bf = "cuda", torch.bfloat16
    R, C = T * K, T * K // E
    torch.manual_seed(0)
    x_tok = torch.randn(T, D, device=dev, dtype=bf)
    row_choice = torch.randperm(R, device=dev).to(torch.int32)   # grouped row -> choice t*K + k
    x = x_tok[(row_choice // K).long()]                           # the dispatched rows
    gy = torch.randn(R, D, device=dev, dtype=bf)
    w1 = torch.randn(E, H, D, device=dev, dtype=bf) / D ** 0.5
    w2 = torch.randn(E, H, D, device=dev, dtype=bf) / H ** 0.5
    counts = torch.full((E,), C, device=dev, dtype=torch.int64)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch.relu(torch.bmm(x.view(E, C, D), w1.transpose(1, 2))).reshape(R, H)
    flops = 2.0 * R * D * H
    print(f"\n=== {name} T={T} D={D} H={H} E={E} k={K} (C={C} rows per expert)", flush=True)
    cases = [  # label, bmm, grouped_mm, triton(tiles), is ragged
        ("fc1", lambda: torch.bmm(x.view(E, C, D), w1.transpose(1, 2)),
         lambda: torch._grouped_mm(x, w1.transpose(1, 2), offs=offs).relu_(),
         lambda t: tg.grouped_rows_mm(x, counts, w1, True, epilogue=tg.EPILOGUE_RELU, tiles=t), False),
        ("fc1 gathered", lambda: torch.bmm(x.view(E, C, D), w1.transpose(1, 2)),
         lambda: torch._grouped_mm(x_tok[(row_choice // K).long()], w1.transpose(1, 2), offs=offs).relu_(),
         lambda t: tg.grouped_rows_mm(x_tok, counts, w1, True, gather_R=row_choice, top_k=K,
                                      epilogue=tg.EPILOGUE_RELU, tiles=t), False),
        ("fc2", lambda: torch.bmm(h.view(E, C, H), w2),
         lambda: torch._grouped_mm(h, w2, offs=offs),
         lambda t: tg.grouped_rows_mm(h, counts, w2, False, tiles=t), False),
        ("dH", lambda: torch.bmm(gy.view(E, C, D), w2.transpose(1, 2)),
         lambda: torch.ops.aten.threshold_backward(torch._grouped_mm(gy, w2.transpose(1, 2), offs=offs), h, 0),
         lambda t: tg.grouped_rows_mm(gy, counts, w2, True, epilogue=tg.EPILOGUE_RELU_GRAD, relu_out=h, tiles=t),
         False),
        ("dX", lambda: torch.bmm(h.view(E, C, H), w1),
         lambda: torch._grouped_mm(h, w1, offs=offs),
         lambda t: tg.grouped_rows_mm(h, counts, w1, False, tiles=t), False),
        ("dW1", lambda: torch.bmm(h.view(E, C, H).transpose(1, 2), x.view(E, C, D)),
         lambda: torch._grouped_mm(h.t(), x, offs=offs),
         lambda t: tg.ragged_k_mm(h, x, counts, tiles=t)[0], True),
        ("dW2", lambda: torch.bmm(h.view(E, C, H).transpose(1, 2), gy.view(E, C, D)),
         lambda: torch._grouped_mm(h.t(), gy, offs=offs),
         lambda t: tg.ragged_k_mm(h, gy, counts, tiles=t)[0], True),
    ]
    for label, bmm, gmm, tri, ragged in cases:
        want = gmm().float().reshape(-1) if ragged else gmm().float()
        _row(f"{label} bmm (floor's GEMM)", pipelined_ms(bmm), flops)
        _row(f"{label} grouped_mm", pipelined_ms(gmm), flops)
        _best(f"{label} triton", RAGGED_TILES if ragged else ROWS_TILES,
              (lambda t: tri(t).reshape(-1)) if ragged else tri, flops, want)


def whole_ffn(name: str, T: int, D: int, H: int, E: int, K: int, profile: bool = False) -> None:
    dev, bf = "cuda", torch.bfloat16
    R, C = T * K, T * K // E
    x = torch.randn(R, D, device=dev, dtype=bf, requires_grad=True)
    w = FFNWeights((torch.randn(E, H, D, device=dev, dtype=bf) / D ** 0.5).requires_grad_(),
                   (torch.randn(E, H, D, device=dev, dtype=bf) / H ** 0.5).requires_grad_())
    counts = torch.full((E,), C, device=dev, dtype=torch.int64)
    gy = torch.randn(R, D, device=dev, dtype=bf)

    def step(bound):
        ffn_grouped(x, counts, w, torch.relu, bound).backward(gy)

    def triton_step(kernels):
        _triton_ffn.relu_ffn(x, counts, w.w1_eHD, None, w.w2_eHO, None, kernels).backward(gy)

    if profile:
        profile_steps({"grouped_mm autograd": lambda: step(None), "padded bmm": lambda: step(C),
                  **{f"triton {k.plain}/{k.weight_grads}": (lambda k=k: triton_step(k)) for k in KERNEL_CHOICES}})
        return
    print(f"  -- {name} whole relu FFN, forward + backward (GEMMs alone: 3 x floor's two)", flush=True)
    flops = 6.0 * 2 * R * D * H
    _triton_ffn.set_enabled(False)   # the default; relu_ffn below is called directly
    _row("grouped_mm autograd", pipelined_ms(lambda: step(None), calls=5), flops)
    _row("padded bmm (cf=1 path)", pipelined_ms(lambda: step(C), calls=5), flops)
    for kernels in KERNEL_CHOICES:
        _row(f"triton relu GEMMs, plain {kernels.plain}, dW {kernels.weight_grads}",
             pipelined_ms(lambda k=kernels: triton_step(k), calls=5), flops)
    print(f"  (kernels_for picks {_triton_ffn.kernels_for(R, E, False)})", flush=True)


def profile_steps(steps: dict) -> None:
    """GPU time per kernel of each step (10 steps after 3 warmup), to find where a whole FFN spends
    more than the sum of its GEMMs."""
    from scripts.bench_ops import kernel_events
    for label, fn in steps.items():
        events = [e for e in kernel_events(fn, 10) if e.device_time_total > 0]
        total = sum(e.device_time_total for e in events) / 10 / 1e3
        wall = pipelined_ms(fn, calls=5)
        host = []
        for _ in range(5):   # host time of one step started on an idle GPU (nothing blocks it)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        print(f"\n  -- {label}: {total:.3f} ms of kernels per step, {wall:.3f} ms per step back to back, "
              f"{statistics.median(host):.3f} ms of host time", flush=True)
        for e in sorted(events, key=lambda e: -e.device_time_total)[:20]:
            name = e.key if len(e.key) <= 100 else e.key[:60] + " ... " + e.key[-35:]
            print(f"    {e.device_time_total / 10 / 1e3:7.3f} ms x{e.count // 10:<3} {name}", flush=True)


def main() -> None:
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    profile = "--profile" in sys.argv
    for name in [a for a in sys.argv[1:] if a != "--profile"] or list(CONFIGS):
        cfg = CONFIGS[name]
        if not profile:
            gemms(name, **cfg)
        whole_ffn(name, **cfg, profile=profile)


if __name__ == "__main__":
    main()
