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
The persistent kernels run the shipped kernels' own tile bodies (``_grouped_rows_tile``,
``_ragged_k_tile``) in their loops, so only the program-to-tile mapping differs.

Legend: T tokens, D model dim, H hidden, E experts, K top-k, R = T*K grouped rows, C = R/E.
"""
from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from adaptmoe.ops import _triton_gemm as tg
from scripts.explore_triton_tma import CONFIGS, compare, operands


@triton.jit
def _rows_persistent_kernel(a_ptr, b_ptr, c_ptr, counts_ptr, E, KD, N, stride_be, stride_bk, stride_bn,
                            N_TILES: tl.constexpr, RELU: tl.constexpr, FLATTEN: tl.constexpr,
                            NUM_PROGRAMS: tl.constexpr, EP: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    experts = tl.arange(0, EP)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    m_tiles = tl.sum((counts + BM - 1) // BM, 0)
    for tile in tl.range(tl.program_id(0), m_tiles * N_TILES, NUM_PROGRAMS, flatten=FLATTEN):
        e, row_stop, first_row = tg._expert_of_tile(counts_ptr, E, tile // N_TILES, EP, BM)
        tg._grouped_rows_tile(a_ptr, a_ptr, b_ptr, a_ptr, a_ptr, c_ptr, e, row_stop, first_row, tile % N_TILES,
                              1, KD, N, stride_be, stride_bk, stride_bn, False, False, 1 if RELU else 0, BM, BN, BK)


@triton.jit
def _ragged_persistent_kernel(a_ptr, b_ptr, c_ptr, counts_ptr, E, P, Q, FLATTEN: tl.constexpr,
                              NUM_PROGRAMS: tl.constexpr, EP: tl.constexpr,
                              BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
    for tile in tl.range(tl.program_id(0), E * (P // BP) * (Q // BQ), NUM_PROGRAMS, flatten=FLATTEN):
        tg._ragged_k_tile(a_ptr, b_ptr, c_ptr, c_ptr, c_ptr, counts_ptr, tile, E, P, Q, False, False, EP, BP, BQ, BK)


@triton.jit
def _rows_order_kernel(a_ptr, gather_ptr, b_ptr, c_ptr, counts_ptr, E, TOP_K, KD, N, M_TILES,
                       stride_be, stride_bk, stride_bn, N_TILES: tl.constexpr, GROUP_M: tl.constexpr,
                       EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # The shipped gathered fc1 + relu with another program-to-tile order: GROUP_M == 0 puts m-tiles
    # fastest (the fifth session's order); GROUP_M > 0 walks GROUP_M m-tiles down one column tile,
    # then the next column tile (blocks of GROUP_M x N_TILES tiles share A rows and B columns in L2).
    pid = tl.program_id(0)
    if GROUP_M == 0:
        pid_m = pid % M_TILES
        pid_n = pid // M_TILES
    else:
        group = pid // (GROUP_M * N_TILES)
        first_m = group * GROUP_M
        group_rows = tl.minimum(M_TILES - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * N_TILES)) % group_rows
        pid_n = (pid % (GROUP_M * N_TILES)) // group_rows
    e, row_stop, first_row = tg._expert_of_tile(counts_ptr, E, pid_m, EP, BM)
    if e >= E:
        return
    tg._grouped_rows_tile(a_ptr, gather_ptr, b_ptr, a_ptr, a_ptr, c_ptr, e, row_stop, first_row, pid_n,
                          TOP_K, KD, N, stride_be, stride_bk, stride_bn, True, False, 1, BM, BN, BK)


def gathered_ordered(x_TD, inv_R, top_k, counts, w1, t: tg.Tiles, group_m: int):
    E, N, KD = w1.shape
    R = inv_R.numel()
    c = torch.empty(R, N, device=x_TD.device, dtype=x_TD.dtype)
    m_tiles = triton.cdiv(R, t.m) + E
    _rows_order_kernel[(m_tiles * (N // t.n),)](
        x_TD, inv_R, w1, c, counts, E, top_k, KD, N, m_tiles, KD * N, 1, KD, N_TILES=N // t.n, GROUP_M=group_m,
        EP=max(16, triton.next_power_of_2(E)), BM=t.m, BN=t.n, BK=t.k, num_warps=t.warps, num_stages=t.stages)
    return c


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
    o = operands(T, D, H, E, K, uneven=False)
    print(f"\n=== {name} T={T} D={D} H={H} E={E} k={K}", flush=True)

    def persistent(fn):
        return {f"persistent flatten={f}": (lambda t, f=f: fn(t, f)) for f in (False, True)}
    compare("fc1+relu", lambda: torch.bmm(o.x.view(E, o.C, D), o.w1.transpose(1, 2)),
            lambda t: tg.grouped_rows_mm(o.x, o.counts, o.w1, True, epilogue=tg.EPILOGUE_RELU, tiles=t),
            persistent(lambda t, f: rows_persistent(o.x, o.counts, o.w1, True, True, t, f)), o.flops)
    compare("fc2", lambda: torch.bmm(o.h.view(E, o.C, H), o.w2),
            lambda t: tg.grouped_rows_mm(o.h, o.counts, o.w2, False, tiles=t),
            persistent(lambda t, f: rows_persistent(o.h, o.counts, o.w2, False, False, t, f)), o.flops)
    x_TD = torch.randn(T, D, device=o.x.device, dtype=o.x.dtype)
    inv_R = torch.randperm(T * K, device=o.x.device)
    orders = {f"order group_m={g}": (lambda t, g=g: gathered_ordered(x_TD, inv_R, K, o.counts, o.w1, t, g))
              for g in (0, 8, 32)}
    compare("gathered fc1+relu (reference: bmm)", lambda: torch.bmm(o.x.view(E, o.C, D), o.w1.transpose(1, 2)),
            lambda t: tg.grouped_rows_mm(x_TD, o.counts, o.w1, True, gather_R=inv_R, top_k=K, epilogue=tg.EPILOGUE_RELU,
                                        tiles=t), orders, o.flops)
    compare("dW1 (reference: grouped_mm)", lambda: torch._grouped_mm(o.h.t(), o.x, offs=o.offs),
            lambda t: tg.ragged_k_mm(o.h, o.x, o.counts, tiles=t)[0],
            persistent(lambda t, f: ragged_persistent(o.h, o.x, o.counts, t, f)), o.flops)


def main() -> None:
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    for name in sys.argv[1:] or list(CONFIGS):
        run(name, **CONFIGS[name])


if __name__ == "__main__":
    main()
