"""Exploration (device machine, not yet run): persistent versions of the Triton grouped GEMMs, one
program per SM looping over output tiles, against the shipped one-program-per-tile kernels
(``adaptmoe.ops._triton_gemm``) and cuBLAS bmm / torch._grouped_mm.

    python3 scripts/explore_triton_persistent.py [fine64 dsv3 mixtral]

Not product code. Why (``native/NOTES.md``, sixth session): our kernels trail cuBLAS by 10-25% and
lose most where each tile reduces over few steps (DeepSeek-V3's ragged weight gradient: 8 steps
of 64 rows per tile), which points at per-tile prologue and epilogue that nothing overlaps. A
persistent loop with ``tl.range(..., flatten=True)`` lets the compiler pipeline the next tile's
loads under the current tile's epilogue. Every tile in the loop is a real one (the row kernel
counts its m-tiles from the counts in registers), so the loop body has no early exit.
Variants per GEMM: flatten on / off. Correctness was checked in Triton's interpreter (CPU, fp32).
The kernels' tile bodies are copies of the shipped kernels' (compared side by side); whichever
wins replaces the other.

Legend: T tokens, D model dim, H hidden, E experts, K top-k, R = T*K grouped rows, C = R/E.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from adaptmoe.examples.timing import pipelined_ms
from adaptmoe.ops import _triton_gemm as tg
from scripts.explore_triton_tma import CONFIGS, TILES, _row


@triton.jit
def _rows_persistent_kernel(a_ptr, b_ptr, c_ptr, counts_ptr, E, KD, N, stride_be, stride_bk, stride_bn,
                            N_TILES: tl.constexpr, RELU: tl.constexpr, FLATTEN: tl.constexpr,
                            NUM_PROGRAMS: tl.constexpr, EP: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    experts = tl.arange(0, EP)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    m_tiles = tl.sum((counts + BM - 1) // BM, 0)
    for tile in tl.range(tl.program_id(0), m_tiles * N_TILES, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m = tile // N_TILES
        pid_n = tile % N_TILES
        e, row_stop, first_row = tg._expert_of_tile(counts_ptr, E, pid_m, EP, BM)
        rows = first_row + tl.arange(0, BM)
        in_rows = rows < row_stop
        cols = pid_n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * KD + ks[None, :]
        b_ptrs = (b_ptr + e.to(tl.int64) * stride_be + cols[None, :].to(tl.int64) * stride_bn
                  + ks[:, None] * stride_bk)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, KD, BK):
            a = tl.load(a_ptrs, mask=in_rows[:, None], other=0.0)
            b = tl.load(b_ptrs)
            acc = tl.dot(a, b, acc)
            a_ptrs += BK
            b_ptrs += BK * stride_bk
        if RELU:
            acc = tl.maximum(acc, 0.0)
        tl.store(c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
                 mask=in_rows[:, None])


@triton.jit
def _ragged_persistent_kernel(a_ptr, b_ptr, c_ptr, counts_ptr, E, P, Q, FLATTEN: tl.constexpr,
                              NUM_PROGRAMS: tl.constexpr, EP: tl.constexpr,
                              BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
    tiles_p = P // BP
    tiles_q = Q // BQ
    experts = tl.arange(0, EP)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    for tile in tl.range(tl.program_id(0), E * tiles_p * tiles_q, NUM_PROGRAMS, flatten=FLATTEN):
        e = tile // (tiles_p * tiles_q)
        pid_p = (tile % (tiles_p * tiles_q)) // tiles_q
        pid_q = tile % tiles_q
        row_start = tl.sum(tl.where(experts < e, counts, 0), 0)
        count = tl.sum(tl.where(experts == e, counts, 0), 0)
        ps = pid_p * BP + tl.arange(0, BP)
        qs = pid_q * BQ + tl.arange(0, BQ)
        ks = tl.arange(0, BK)
        rows = (row_start + ks).to(tl.int64)
        a_ptrs = a_ptr + rows[:, None] * P + ps[None, :]
        b_ptrs = b_ptr + rows[:, None] * Q + qs[None, :]
        acc = tl.zeros((BP, BQ), dtype=tl.float32)
        for k in range(0, tl.cdiv(count, BK)):
            in_rows = (k * BK + ks) < count
            a = tl.load(a_ptrs, mask=in_rows[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=in_rows[:, None], other=0.0)
            acc = tl.dot(tl.trans(a), b, acc)
            a_ptrs += BK * P
            b_ptrs += BK * Q
        tl.store(c_ptr + e.to(tl.int64) * P * Q + ps[:, None].to(tl.int64) * Q + qs[None, :],
                 acc.to(c_ptr.dtype.element_ty))


def _programs(device) -> int:
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4   # the interpreter (CPU): a few programs, so each loops over several tiles


def rows_persistent(a, counts, b, trans_b: bool, relu: bool, t: tg.Tiles, flatten: bool):
    E = b.shape[0]
    N, KD = (b.shape[1], b.shape[2]) if trans_b else (b.shape[2], b.shape[1])
    c = torch.empty(a.shape[0], N, device=a.device, dtype=a.dtype)
    stride_bk, stride_bn = (1, KD) if trans_b else (N, 1)
    programs = _programs(a.device)
    _rows_persistent_kernel[(programs,)](
        a, b, c, counts, E, KD, N, KD * N, stride_bk, stride_bn, N_TILES=N // t.n, RELU=relu, FLATTEN=flatten,
        NUM_PROGRAMS=programs, EP=max(16, triton.next_power_of_2(E)), BM=t.m, BN=t.n, BK=t.k,
        num_warps=t.warps, num_stages=t.stages)
    return c


def ragged_persistent(a, b, counts, t: tg.Tiles, flatten: bool):
    E, P, Q = counts.numel(), a.shape[1], b.shape[1]
    c = torch.empty(E, P, Q, device=a.device, dtype=a.dtype)
    programs = _programs(a.device)
    _ragged_persistent_kernel[(programs,)](
        a, b, c, counts, E, P, Q, FLATTEN=flatten, NUM_PROGRAMS=programs, EP=max(16, triton.next_power_of_2(E)),
        BP=t.m, BQ=t.n, BK=t.k, num_warps=t.warps, num_stages=t.stages)
    return c


def run(name: str, T: int, D: int, H: int, E: int, K: int) -> None:
    bf, dev = torch.bfloat16, "cuda"
    R, C = T * K, T * K // E
    torch.manual_seed(0)
    x = torch.randn(R, D, device=dev, dtype=bf)
    w1 = torch.randn(E, H, D, device=dev, dtype=bf) / D ** 0.5
    w2 = torch.randn(E, H, D, device=dev, dtype=bf) / H ** 0.5
    counts = torch.full((E,), C, device=dev, dtype=torch.int64)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch.relu(torch._grouped_mm(x, w1.transpose(1, 2), offs=offs))
    flops = 2.0 * R * D * H
    print(f"\n=== {name} T={T} D={D} H={H} E={E} k={K}", flush=True)
    cases = [
        ("fc1+relu", lambda: torch.bmm(x.view(E, C, D), w1.transpose(1, 2)),
         lambda t: tg.grouped_rows_mm(x, counts, w1, True, epilogue=tg.EPILOGUE_RELU, tiles=t),
         lambda t, f: rows_persistent(x, counts, w1, True, True, t, f)),
        ("fc2", lambda: torch.bmm(h.view(E, C, H), w2),
         lambda t: tg.grouped_rows_mm(h, counts, w2, False, tiles=t),
         lambda t, f: rows_persistent(h, counts, w2, False, False, t, f)),
        ("dW1 (reference: grouped_mm)", lambda: torch._grouped_mm(h.t(), x, offs=offs),
         lambda t: tg.ragged_k_mm(h, x, counts, tiles=t)[0],
         lambda t, f: ragged_persistent(h, x, counts, t, f)),
    ]
    for label, reference, shipped, persistent in cases:
        _row(f"{label} reference", pipelined_ms(reference), flops)
        for t in TILES:
            want = shipped(t).float()
            _row(f"{label} shipped {tuple(t)}", pipelined_ms(lambda t=t: shipped(t)), flops)
            for flatten in (False, True):
                try:
                    err = (persistent(t, flatten).float() - want).abs().max().item()
                    _row(f"{label} persistent flatten={flatten} {tuple(t)}",
                         pipelined_ms(lambda t=t, f=flatten: persistent(t, f)), flops, err)
                except Exception as exc:   # an exploration: report and go on
                    print(f"  {label} persistent flatten={flatten} {tuple(t)} failed: {str(exc)[:300]}", flush=True)


def main() -> None:
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    for name in sys.argv[1:] or list(CONFIGS):
        run(name, **CONFIGS[name])


if __name__ == "__main__":
    main()
