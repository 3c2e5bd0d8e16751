"""Exploration (device machine): program-to-tile orders and persistent loops for the Triton row
GEMM, against the shipped kernel (``adaptmoe.ops._triton_gemm``) and cuBLAS bmm / grouped_mm.

    python3 scripts/explore_triton_persistent.py [fine64 dsv3 mixtral] [--ragged]

Not product code. It found what the shipped row kernel now does (seventh session,
``h100_explore_triton_persistent_orders.log``): one program per SM looping over the real tiles,
in blocks of 8 m-tiles per column tile. Variants kept here: one program per tile in any order
(``rows_ordered``; GROUP_M 0 = m-tiles fastest, 1 = column tiles fastest), and the persistent loop
with ``tl.range(..., flatten=True)`` (pipelines the next tile's loads under this tile's epilogue:
won 1-3% on some first GEMMs, ran fc2 2.5-3x slower), and a persistent ragged weight-gradient
kernel (``--ragged``: no gain, ``h100_explore_triton_persistent.log``). Correctness of every
variant: Triton's interpreter on CPU (``scripts/check_triton_on_cpu.py``). All run the shipped
tile bodies (``_grouped_rows_tile``, ``_ragged_k_tile``); only the mapping of programs to tiles
differs.

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
def _tile_of(pid, M_TILES, N_TILES: tl.constexpr, GROUP_M: tl.constexpr):
    """(m-tile, column tile) of program or loop index ``pid``. GROUP_M == 0: m-tiles fastest (the
    fifth session's order); GROUP_M == 1: column tiles fastest (the sixth session's); GROUP_M > 1:
    the shipped blocks of GROUP_M m-tiles (``_triton_gemm._tile_of``)."""
    if GROUP_M == 0:
        return pid % M_TILES, pid // M_TILES
    return tg._tile_of(pid, M_TILES, N_TILES, GROUP_M)


@triton.jit
def _rows_persistent_kernel(a_ptr, gather_ptr, b_ptr, c_ptr, counts_ptr, E, TOP_K, KD, N, stride_be, stride_bk,
                            stride_bn, N_TILES: tl.constexpr, GATHER: tl.constexpr, RELU: tl.constexpr,
                            FLATTEN: tl.constexpr, GROUP_M: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                            EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    experts = tl.arange(0, EP)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    m_tiles = tl.sum((counts + BM - 1) // BM, 0)
    for tile in tl.range(tl.program_id(0), m_tiles * N_TILES, NUM_PROGRAMS, flatten=FLATTEN):
        pid_m, pid_n = _tile_of(tile, m_tiles, N_TILES, GROUP_M)
        e, row_stop, first_row = tg._expert_of_tile(counts_ptr, E, pid_m, EP, BM)
        tg._grouped_rows_tile(a_ptr, gather_ptr, gather_ptr, b_ptr, a_ptr, a_ptr, c_ptr, e, row_stop, first_row, pid_n,
                              TOP_K, KD, N, stride_be, stride_bk, stride_bn, GATHER, False, False, 1 if RELU else 0,
                              BM, BN, BK)


@triton.jit
def _ragged_persistent_kernel(a_ptr, b_ptr, c_ptr, counts_ptr, E, P, Q, FLATTEN: tl.constexpr,
                              NUM_PROGRAMS: tl.constexpr, EP: tl.constexpr,
                              BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
    for tile in tl.range(tl.program_id(0), E * (P // BP) * (Q // BQ), NUM_PROGRAMS, flatten=FLATTEN):
        tg._ragged_k_tile(a_ptr, b_ptr, c_ptr, c_ptr, c_ptr, counts_ptr, tile, E, P, Q, False, False, EP, BP, BQ, BK)


@triton.jit
def _rows_order_kernel(a_ptr, gather_ptr, b_ptr, c_ptr, counts_ptr, E, TOP_K, KD, N, M_TILES,
                       stride_be, stride_bk, stride_bn, N_TILES: tl.constexpr, GATHER: tl.constexpr,
                       RELU: tl.constexpr, GROUP_M: tl.constexpr,
                       EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    # The shipped row kernel (one program per tile) with another program-to-tile order (_tile_of)
    pid_m, pid_n = _tile_of(tl.program_id(0), M_TILES, N_TILES, GROUP_M)
    e, row_stop, first_row = tg._expert_of_tile(counts_ptr, E, pid_m, EP, BM)
    if e >= E:
        return
    tg._grouped_rows_tile(a_ptr, gather_ptr, gather_ptr, b_ptr, a_ptr, a_ptr, c_ptr, e, row_stop, first_row, pid_n,
                          TOP_K, KD, N, stride_be, stride_bk, stride_bn, GATHER, False, False, 1 if RELU else 0,
                          BM, BN, BK)


def _b_layout(b, trans_b: bool):
    """(N, KD, stride_bk, stride_bn) of expert matrices b given as [E, N, KD] (trans_b) or [E, KD, N]."""
    N, KD = (b.shape[1], b.shape[2]) if trans_b else (b.shape[2], b.shape[1])
    return (N, KD, 1, KD) if trans_b else (N, KD, N, 1)


def rows_ordered(a, counts, b, trans_b: bool, relu: bool, t: tg.Tiles, group_m: int, gather=None, top_k=1):
    E = b.shape[0]
    N, KD, stride_bk, stride_bn = _b_layout(b, trans_b)
    R = a.shape[0] if gather is None else gather.numel()
    c = torch.empty(R, N, device=a.device, dtype=a.dtype)
    m_tiles = triton.cdiv(R, t.m) + E
    _rows_order_kernel[(m_tiles * (N // t.n),)](
        a, a if gather is None else gather, b, c, counts, E, top_k, KD, N, m_tiles, KD * N, stride_bk, stride_bn,
        N_TILES=N // t.n, GATHER=gather is not None, RELU=relu, GROUP_M=group_m,
        EP=max(16, triton.next_power_of_2(E)), BM=t.m, BN=t.n, BK=t.k, num_warps=t.warps, num_stages=t.stages)
    return c


def _programs(device) -> int:
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4   # the interpreter (CPU): a few programs, so each loops over several tiles


def rows_persistent(a, counts, b, trans_b: bool, relu: bool, t: tg.Tiles, flatten: bool, group_m: int = 1,
                    gather=None, top_k=1):
    E = b.shape[0]
    N, KD, stride_bk, stride_bn = _b_layout(b, trans_b)
    R = a.shape[0] if gather is None else gather.numel()
    c = torch.empty(R, N, device=a.device, dtype=a.dtype)
    programs = _programs(a.device)
    _rows_persistent_kernel[(programs,)](
        a, a if gather is None else gather, b, c, counts, E, top_k, KD, N, KD * N, stride_bk, stride_bn,
        N_TILES=N // t.n, GATHER=gather is not None, RELU=relu, FLATTEN=flatten, GROUP_M=group_m,
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
    x_TD = torch.randn(T, D, device=o.x.device, dtype=o.x.dtype)
    inv_R = torch.randperm(T * K, device=o.x.device)
    # (label, a, b, trans_b, relu, gather, flatten choices): flatten=True ran fc2 2.5-3x slower (first run)
    gemms = [("fc1+relu", o.x, o.w1, True, True, None, (False, True)),
             ("fc2", o.h, o.w2, False, False, None, (False,)),
             ("gathered fc1+relu", x_TD, o.w1, True, True, inv_R, (False, True))]
    for label, a, b, trans_b, relu, gather, flattens in gemms:
        variants = {"order group_m=8": lambda t, a=a, b=b, tb=trans_b, r=relu, g=gather:
                    rows_ordered(a, o.counts, b, tb, r, t, 8, g, K)}
        for f in flattens:
            for g in (1, 8):
                variants[f"persistent flatten={f} group_m={g}"] = (
                    lambda t, a=a, b=b, tb=trans_b, r=relu, gt=gather, f=f, g=g:
                    rows_persistent(a, o.counts, b, tb, r, t, f, g, gt, K))
        epilogue = tg.EPILOGUE_RELU if relu else tg.EPILOGUE_NONE
        compare(label, lambda: torch.bmm(o.x.view(E, o.C, D), o.w1.transpose(1, 2)) if trans_b
                else torch.bmm(o.h.view(E, o.C, H), o.w2),
                lambda t, a=a, b=b, tb=trans_b, g=gather, ep=epilogue:
                tg.grouped_rows_mm(a, o.counts, b, tb, gather_R=g, top_k=K, epilogue=ep, tiles=t), variants, o.flops)
    if "--ragged" in sys.argv:   # first run (h100_explore_triton_persistent.log): no gain over the shipped kernel
        compare("dW1 (reference: grouped_mm)", lambda: torch._grouped_mm(o.h.t(), o.x, offs=o.offs),
                lambda t: tg.ragged_k_mm(o.h, o.x, o.counts, tiles=t)[0],
                {f"persistent flatten={f}": (lambda t, f=f: ragged_persistent(o.h, o.x, o.counts, t, f))
                 for f in (False, True)}, o.flops)


def main() -> None:
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    for name in [a for a in sys.argv[1:] if not a.startswith("--")] or list(CONFIGS):
        run(name, **CONFIGS[name])


if __name__ == "__main__":
    main()
