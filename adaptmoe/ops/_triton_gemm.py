"""Grouped expert GEMMs in Triton over expert-major rows whose per-expert counts stay on the GPU.

Legend: T tokens, D model dim, H hidden, O output dim, E experts, K top-k, R grouped rows
(expert e owns counts_E[e] consecutive rows), P x Q one expert's weight-gradient matrix.

Two kernels, each with no host synchronization (the expert of a tile comes from prefix sums of the
counts, computed in registers):
- ``grouped_rows_mm``: c[r] = epilogue(a[r] @ B[e(r)] + bias[e(r)]), B given by strides so one
  kernel serves x w1^T, h w2, gy w2^T and gh w1; the A rows may be gathered from the tokens (row
  r reads token gather[r] // K: no dispatch pass); epilogue relu, or relu's backward masked by
  the saved relu output (no separate elementwise pass either way).
- ``ragged_k_mm``: c[e] = a[rows of e]^T @ b[rows of e], the weight gradients, with optional fp32
  column sums of a or b over the same rows (bias gradients).

Why: ``torch._grouped_mm`` has no epilogue (a relu pass, a threshold_backward pass, a dispatch
pass around it) and its ragged-K weight gradient ran 14-33% slower than cuBLAS's bmm at the same
balanced counts on an H100 (``native/NOTES.md``, fourth session). Measured per GEMM and shape by
``scripts/explore_triton_train.py`` and ``scripts/explore_triton_persistent.py``: the gathered
first GEMM serves the large dropless no-grad forward of experts up to ``MAX_EXPERT_WEIGHTS``
(graphed layer A/B on an H100, balanced: DeepSeek-V3 12.99 ms vs 13.33 on grouped_mm,
fine-grained 1.08 vs 1.23, ``h100_ab_gathered_graphed_session7.log``); in training the kernels
win some GEMMs and lose others, and a whole training FFN on them was slower than grouped_mm's,
so ``_triton_ffn`` is opt-in (see there). ``_triton_slotted`` uses the row kernel's scattered
rows and ``ragged_k_move`` to fix up the overflow rows of dropless training in capacity slots.

Triton ships with torch's CUDA wheels (torch.compile's code generator); where it cannot be
imported these paths are not taken and the blockers say so.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from ._triton_native import RegisteredLaunches

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU wheels, other platforms: the grouped_mm path serves instead
    triton = None

# (rtol, atol) against the float64 reference of the same inputs: fp32 accumulation, one bf16
# rounding of the output (the bias is added before it, unlike the grouped_mm chain).
TOLERANCE = (2e-2, 2e-2)
# H*D of one expert's first matrix up to which the gathered first GEMM serves the no-grad forward.
# Mixtral's 4096x14336 experts stay on grouped_mm: an interleaved A/B called it a tie (graphed,
# 5.83 vs 5.84 ms, h100_ab_gathered_graphed_session7.log), but bench_layer's graphed dropless
# forward read +6.3% and +12% over cf=1 with it (h100_bench_layer_session7_balanced_30ec3e7.log,
# _4c1a88f.log) against +4.7% without (96e8220). DeepSeek-V3's 7168x2048 and fine-grained
# experts gain (12.99 vs 13.33 ms, 1.08 vs 1.23).
MAX_EXPERT_WEIGHTS = 1 << 24
EPILOGUE_NONE, EPILOGUE_RELU, EPILOGUE_RELU_GRAD = 0, 1, 2


class Tiles(NamedTuple):
    """Tile shape and pipeline of one launch: rows x columns x reduction step, warps, stages."""
    m: int
    n: int
    k: int
    warps: int
    stages: int


# The fastest of the shapes tried for the GEMMs of fine-grained, DeepSeek-V3 and README experts
# (scripts/explore_triton_train.py, H100: 4 stages beat 3 by up to 10%); Mixtral's experts ran
# faster with 3 stages (fc1 3.59 vs 4.07 ms), but they keep grouped_mm anyway.
ROWS_TILES = Tiles(m=128, n=256, k=64, warps=8, stages=4)
RAGGED_TILES = Tiles(m=128, n=256, k=64, warps=8, stages=4)
# m-tiles per block of the row kernel's tile order (``_tile_of``); 8 beat 1 (column tiles fastest)
# and 32 on every shape tried (h100_explore_triton_persistent_orders.log).
ROWS_GROUP_M = 8


if triton is not None:
    @triton.jit
    def _expert_of_tile(counts_ptr, E, pid_m, EP: tl.constexpr, BM: tl.constexpr):
        """(expert, end of its rows, first row of this tile) of m-tile ``pid_m`` when each expert's
        rows are cut into BM-row tiles laid end to end; expert == E past the last tile."""
        experts = tl.arange(0, EP)
        counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
        tiles = (counts + BM - 1) // BM
        tile_end = tl.cumsum(tiles, 0)
        row_end = tl.cumsum(counts, 0)
        e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
        mine = experts == e
        tile_start = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
        row_start = tl.sum(tl.where(mine, row_end - counts, 0), 0)
        row_stop = tl.sum(tl.where(mine, row_end, 0), 0)
        return e, row_stop, row_start + (pid_m - tile_start) * BM

    @triton.jit
    def _tile_of(tile, M_TILES, N_TILES: tl.constexpr, GROUP_M: tl.constexpr):
        """(m-tile, column tile) of output tile ``tile``: GROUP_M m-tiles down one column tile,
        then the next column tile, block after block. Tiles in flight together then share
        GROUP_M tiles of A rows and a few columns of one expert's B, which L2 serves (column
        tiles fastest re-read B from HBM per m-tile: Mixtral fc1 4.10 vs 3.26 ms; m-tiles
        fastest re-read A per column tile: DeepSeek-V3 gathered fc1 7.90 vs 6.58)."""
        first_m = (tile // (GROUP_M * N_TILES)) * GROUP_M
        group_rows = tl.minimum(M_TILES - first_m, GROUP_M)
        in_group = tile % (GROUP_M * N_TILES)
        return first_m + in_group % group_rows, in_group // group_rows

    @triton.jit
    def _grouped_rows_kernel(a_ptr, gather_ptr, scatter_ptr, b_ptr, bias_ptr, mask_ptr, c_ptr, counts_ptr,
                             E, TOP_K, KD, N, stride_be, stride_bk, stride_bn, PROGRAMS,
                             N_TILES: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
                             HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, GROUP_M: tl.constexpr,
                             EP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # c[r] = epilogue(a[r] @ B[e(r)] + bias[e(r)]) over expert-grouped rows. Persistent: PROGRAMS
        # programs (at most one per SM; a runtime value, so batch sizes that change every call
        # do not compile new kernels) loop over the real tiles, whose number comes from the
        # counts, so no program is launched for the spare tiles a host-sized grid would need.
        # With _tile_of's order, against one program per tile with column tiles fastest (H100,
        # h100_explore_triton_persistent_orders.log): fc1 + relu fine-grained 0.461 -> 0.442 ms,
        # DeepSeek-V3 6.58 -> 6.11, Mixtral 4.10 -> 3.26; gathered fc1 0.480 -> 0.440, 6.67 ->
        # 6.16, 4.19 -> 3.03; fc2 0.452 -> 0.448, 6.65 -> 6.19, Mixtral 2.86 -> 2.90 (the one loss).
        experts = tl.arange(0, EP)
        counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
        m_tiles = tl.sum((counts + BM - 1) // BM, 0)
        for tile in tl.range(tl.program_id(0), m_tiles * N_TILES, PROGRAMS):
            pid_m, pid_n = _tile_of(tile, m_tiles, N_TILES, GROUP_M)
            e, row_stop, first_row = _expert_of_tile(counts_ptr, E, pid_m, EP, BM)
            _grouped_rows_tile(a_ptr, gather_ptr, scatter_ptr, b_ptr, bias_ptr, mask_ptr, c_ptr, e, row_stop,
                               first_row, pid_n, TOP_K, KD, N, stride_be, stride_bk, stride_bn, GATHER, SCATTER,
                               HAS_BIAS, EPILOGUE, BM, BN, BK)

    @triton.jit
    def _grouped_rows_tile(a_ptr, gather_ptr, scatter_ptr, b_ptr, bias_ptr, mask_ptr, c_ptr, e, row_stop, first_row,
                           pid_n, TOP_K, KD, N, stride_be, stride_bk, stride_bn, GATHER: tl.constexpr,
                           SCATTER: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """One BM x BN output tile of ``_grouped_rows_kernel``: rows [first_row, first_row + BM) of
        expert e (those at or past row_stop belong to the next expert: read as 0, not stored).
        SCATTER 1 (with GATHER, TOP_K 1): the output row, and the relu mask's, is the gathered row;
        SCATTER 2: output row r is scatter[r] (the relu mask's too)."""
        rows = first_row + tl.arange(0, BM)
        in_rows = rows < row_stop
        if GATHER:   # row r is choice gather[r] of token gather[r] // TOP_K: read the token itself
            a_rows = (tl.load(gather_ptr + rows, mask=in_rows, other=0) // TOP_K).to(tl.int64)
        else:
            a_rows = rows.to(tl.int64)
        cols = pid_n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        a_ptrs = a_ptr + a_rows[:, None] * KD + ks[None, :]
        b_ptrs = b_ptr + e.to(tl.int64) * stride_be + cols[None, :].to(tl.int64) * stride_bn + ks[:, None] * stride_bk
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, KD, BK):
            a = tl.load(a_ptrs, mask=in_rows[:, None], other=0.0)
            b = tl.load(b_ptrs)
            acc = tl.dot(a, b, acc)
            a_ptrs += BK
            b_ptrs += BK * stride_bk
        if HAS_BIAS:
            acc += tl.load(bias_ptr + e.to(tl.int64) * N + cols).to(tl.float32)[None, :]
        if SCATTER == 2:
            c_rows = tl.load(scatter_ptr + rows, mask=in_rows, other=0).to(tl.int64)
            c_offsets = c_rows[:, None] * N + cols[None, :]
        elif SCATTER == 1:
            c_offsets = a_rows[:, None] * N + cols[None, :]
        else:
            c_offsets = rows[:, None].to(tl.int64) * N + cols[None, :]
        if EPILOGUE == 1:     # relu
            acc = tl.maximum(acc, 0.0)
        elif EPILOGUE == 2:   # relu's backward: keep the gradient where the saved relu output is > 0
            kept = tl.load(mask_ptr + c_offsets, mask=in_rows[:, None], other=0.0)
            acc = tl.where(kept > 0, acc, 0.0)
        tl.store(c_ptr + c_offsets, acc.to(c_ptr.dtype.element_ty), mask=in_rows[:, None])

    @triton.jit
    def _ragged_k_kernel(a_ptr, b_ptr, c_ptr, sum_a_ptr, sum_b_ptr, counts_ptr, E, P, Q,
                         SUM_A: tl.constexpr, SUM_B: tl.constexpr,
                         EP: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
        # c[e] = a[rows of e]^T @ b[rows of e] (P x Q per expert; the reduction runs over that
        # expert's rows, however many: zero rows write zeros). Expert-major program order keeps
        # one expert's rows in L2 while its P x Q tiles run. Optional fp32 column sums of a and b
        # over the same rows (bias gradients) come from the tiles of the first column / row.
        _ragged_k_tile(a_ptr, b_ptr, c_ptr, sum_a_ptr, sum_b_ptr, counts_ptr, tl.program_id(0), E, P, Q,
                       SUM_A, SUM_B, EP, BP, BQ, BK)

    @triton.jit
    def _ragged_k_tile(a_ptr, b_ptr, c_ptr, sum_a_ptr, sum_b_ptr, counts_ptr, tile, E, P, Q,
                       SUM_A: tl.constexpr, SUM_B: tl.constexpr,
                       EP: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
        """Output tile ``tile`` of ``_ragged_k_kernel`` (expert-major, then P, then Q tiles)."""
        tiles_p = tl.cdiv(P, BP)
        tiles_q = tl.cdiv(Q, BQ)
        e = tile // (tiles_p * tiles_q)
        experts = tl.arange(0, EP)
        counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
        row_start = tl.sum(tl.where(experts < e, counts, 0), 0)
        count = tl.sum(tl.where(experts == e, counts, 0), 0)
        _ragged_k_body(a_ptr, b_ptr, c_ptr, sum_a_ptr, sum_b_ptr, a_ptr, e, (tile % (tiles_p * tiles_q)) // tiles_q,
                       tile % tiles_q, row_start, count, P, Q, 1.0, SUM_A, SUM_B, False, False, BP, BQ, BK)

    @triton.jit
    def _ragged_k_body(a_ptr, b_ptr, c_ptr, sum_a_ptr, sum_b_ptr, gather_ptr, e, pid_p, pid_q, row_start, count,
                       P, Q, sign, SUM_A: tl.constexpr, SUM_B: tl.constexpr, GATHER: tl.constexpr,
                       UPDATE: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
        """c[e] tile (pid_p, pid_q) over grouped rows [row_start, row_start + count). GATHER:
        grouped row r is row gather[r] of a and b. UPDATE: c[e] += sign * the tile, else c[e] = it."""
        ps = pid_p * BP + tl.arange(0, BP)
        qs = pid_q * BQ + tl.arange(0, BQ)
        ks = tl.arange(0, BK)
        rows = (row_start + ks).to(tl.int64)
        a_ptrs = a_ptr + rows[:, None] * P + ps[None, :]
        b_ptrs = b_ptr + rows[:, None] * Q + qs[None, :]
        acc = tl.zeros((BP, BQ), dtype=tl.float32)
        sum_a = tl.zeros((BP,), dtype=tl.float32)
        sum_b = tl.zeros((BQ,), dtype=tl.float32)
        for k in range(0, tl.cdiv(count, BK)):
            in_rows = (k * BK + ks) < count
            if GATHER:
                src = tl.load(gather_ptr + rows + k * BK, mask=in_rows, other=0).to(tl.int64)
                a = tl.load(a_ptr + src[:, None] * P + ps[None, :], mask=in_rows[:, None], other=0.0)
                b = tl.load(b_ptr + src[:, None] * Q + qs[None, :], mask=in_rows[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=in_rows[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=in_rows[:, None], other=0.0)
            acc = tl.dot(tl.trans(a), b, acc)
            if SUM_A:
                sum_a += tl.sum(a.to(tl.float32), 0)
            if SUM_B:
                sum_b += tl.sum(b.to(tl.float32), 0)
            a_ptrs += BK * P
            b_ptrs += BK * Q
        e64 = e.to(tl.int64)
        c_ptrs = c_ptr + e64 * P * Q + ps[:, None].to(tl.int64) * Q + qs[None, :]
        if UPDATE:
            acc = tl.load(c_ptrs).to(tl.float32) + sign * acc
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))
        if SUM_A:
            if pid_q == 0:
                tl.store(sum_a_ptr + e64 * P + ps, sum_a)
        if SUM_B:
            if pid_p == 0:
                tl.store(sum_b_ptr + e64 * Q + qs, sum_b)

    @triton.jit
    def _nth_active(counts, n):
        """Index of the n-th (from 0) nonzero entry of ``counts``."""
        return tl.sum((tl.cumsum((counts > 0).to(tl.int32), 0) <= n).to(tl.int32), 0)

    @triton.jit
    def _ragged_k_move_kernel(a_ptr, b_ptr, c_ptr, remove_ptr, add_ptr, gather_ptr, E, P, Q, PROGRAMS,
                              EP: tl.constexpr, BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
        # c[e] -= a[rows removed from e]^T b[same], c[e] += a[rows added to e]^T b[same], both row
        # groups consecutive in gather (counts remove / add). Persistent over the tiles of the
        # experts with rows only: with none, a launch of PROGRAMS programs that find no tile. An
        # expert is never in both groups (see ragged_k_move), so no two programs share a tile.
        experts = tl.arange(0, EP)
        remove = tl.load(remove_ptr + experts, mask=experts < E, other=0)
        add = tl.load(add_ptr + experts, mask=experts < E, other=0)
        n_remove = tl.sum((remove > 0).to(tl.int32), 0)
        n_add = tl.sum((add > 0).to(tl.int32), 0)
        tiles_q = Q // BQ
        per_expert = (P // BP) * tiles_q
        for tile in tl.range(tl.program_id(0), (n_remove + n_add) * per_expert, PROGRAMS):
            nth = tile // per_expert
            removing = nth < n_remove
            counts = tl.where(removing, remove, add)
            e = _nth_active(counts, tl.where(removing, nth, nth - n_remove))
            row_start = tl.sum(tl.where(experts < e, counts, 0), 0)
            count = tl.sum(tl.where(experts == e, counts, 0), 0)
            within = tile % per_expert
            _ragged_k_body(a_ptr, b_ptr, c_ptr, c_ptr, c_ptr, gather_ptr, e, within // tiles_q, within % tiles_q,
                           row_start, count, P, Q, tl.where(removing, -1.0, 1.0), False, False, True, True,
                           BP, BQ, BK)


if triton is not None:   # Python's launches of the kernels above (see _triton_native.RegisteredLaunches)
    _grouped_rows_launches = RegisteredLaunches(_grouped_rows_kernel)
    _ragged_k_move_launches = RegisteredLaunches(_ragged_k_move_kernel)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4   # Triton's interpreter (CPU checks): a few programs, each looping over several tiles
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _experts_pow2(E: int) -> int:
    return max(16, triton.next_power_of_2(E))


def grouped_rows_mm(a: Tensor, counts_E: Tensor, b_E: Tensor, transpose_b: bool, *, bias_EN: Tensor | None = None,
                    gather_R: Tensor | None = None, top_k: int = 1, epilogue: int = EPILOGUE_NONE,
                    relu_out: Tensor | None = None, out: Tensor | None = None, scatter_R: Tensor | None = None,
                    tiles: Tiles = ROWS_TILES) -> Tensor:
    """c_RN[r] = epilogue(a[r'] @ B_e + bias_EN[e]) for the expert e owning grouped row r, where
    B_e = b_E[e]^T if ``transpose_b`` else b_E[e] (so [E, N, KD] or [E, KD, N]) and r' = r, or
    gather_R[r] // top_k when ``gather_R`` is given (a holds tokens). ``relu_out`` (R x N, the
    saved relu output) is the mask of EPILOGUE_RELU_GRAD. With ``out`` the rows go into it: to
    out[scatter_R[r]] when ``scatter_R`` is given, else (gather_R given, top_k 1) to out[r']; the
    relu mask is read at the same row, and only the first sum(counts_E) entries of gather_R (and
    scatter_R) are used (they may be longer). No autograd; check a blocker first."""
    N = b_E.shape[1] if transpose_b else b_E.shape[2]
    if out is not None and (out.shape[1] != N or not out.is_contiguous()):
        raise ValueError("out= needs a contiguous output of N columns")
    if out is not None and scatter_R is None and (gather_R is None or top_k != 1):
        raise ValueError("out= without scatter_R needs gather_R and top_k=1 (rows go back where they came from)")
    if scatter_R is not None and (out is None or gather_R is None or scatter_R.numel() < gather_R.numel()):
        raise ValueError("scatter_R needs out=, gather_R and at least as many entries as gather_R")
    return _launch_grouped_rows(a, counts_E, b_E, transpose_b, bias_EN, gather_R, top_k, epilogue, relu_out, out,
                                tiles, scatter_R)


# _grouped_rows_kernel's SCATTER modes: rows in place, back to their gathered row, to scatter_R's row.
SCATTER_NONE, SCATTER_GATHERED, SCATTER_INDEXED = 0, 1, 2


@functools.lru_cache(maxsize=None)
def _rows_launch_shape(E: int, N: int, KD: int, gather: bool, scatter: int, bias: bool, epilogue: int,
                       tiles: Tiles) -> tuple[tuple[str, object], ...]:
    """The keyword arguments (constexprs, num_warps, num_stages) of a ``_grouped_rows_kernel``
    launch, as items: what tells its compiled variants apart (``_triton_native.RegisteredLaunches``).
    Memoised: the native forward looks its variants up per call."""
    block_n = tiles.n if N % tiles.n == 0 else 128   # the blocker asks N % 128 == 0, KD % 64 == 0
    block_k = tiles.k if KD % tiles.k == 0 else 64
    return tuple(dict(N_TILES=N // block_n, GATHER=gather, SCATTER=scatter, HAS_BIAS=bias, EPILOGUE=epilogue,
                      GROUP_M=ROWS_GROUP_M, EP=_experts_pow2(E), BM=tiles.m, BN=block_n, BK=block_k,
                      num_warps=tiles.warps, num_stages=tiles.stages).items())


def _launch_grouped_rows(a: Tensor, counts_E: Tensor, b_E: Tensor, transpose_b: bool, bias_EN: Tensor | None,
                         gather_R: Tensor | None, top_k: int, epilogue: int, relu_out: Tensor | None,
                         out: Tensor | None, tiles: Tiles, scatter_R: Tensor | None = None) -> Tensor:
    """grouped_rows_mm without the checks of ``out`` and ``scatter_R``."""
    E = b_E.shape[0]
    N, KD = (b_E.shape[1], b_E.shape[2]) if transpose_b else (b_E.shape[2], b_E.shape[1])
    R = a.shape[0] if gather_R is None else gather_R.numel()
    c_RN = torch.empty(R, N, device=a.device, dtype=a.dtype) if out is None else out
    if R == 0:
        return c_RN
    scatter = SCATTER_NONE if out is None else SCATTER_GATHERED if scatter_R is None else SCATTER_INDEXED
    shape = _rows_launch_shape(E, N, KD, gather_R is not None, scatter, bias_EN is not None, epilogue, tiles)
    stride_bk, stride_bn = (1, KD) if transpose_b else (N, 1)
    launch = dict(shape)
    programs = min(_sm_count(a.device), (triton.cdiv(R, tiles.m) + E) * launch["N_TILES"])
    dummy = a   # pointer arguments a disabled feature never reads
    _grouped_rows_launches(
        programs, a.contiguous(), dummy if gather_R is None else gather_R, dummy if scatter_R is None else scatter_R,
        b_E, dummy if bias_EN is None else bias_EN, dummy if relu_out is None else relu_out, c_RN, counts_E, E, top_k,
        KD, N, KD * N, stride_bk, stride_bn, programs, **launch)
    return c_RN


def ragged_k_mm(a_RP: Tensor, b_RQ: Tensor, counts_E: Tensor, *, sum_a: bool = False, sum_b: bool = False,
                tiles: Tiles = RAGGED_TILES) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(c_EPQ, sum_a_EP, sum_b_EQ): c[e] = a[rows of e]^T b[rows of e]; the sums (fp32, when
    asked) are a's and b's columns summed over the same rows. No autograd."""
    E, P, Q = counts_E.numel(), a_RP.shape[1], b_RQ.shape[1]
    c_EPQ = torch.empty(E, P, Q, device=a_RP.device, dtype=a_RP.dtype)
    sum_a_EP = torch.empty(E, P, device=a_RP.device, dtype=torch.float32) if sum_a else None
    sum_b_EQ = torch.empty(E, Q, device=a_RP.device, dtype=torch.float32) if sum_b else None
    block_p = tiles.m if P % tiles.m == 0 else 128   # stores are unmasked: P, Q % 128 == 0 (blocker)
    block_q = tiles.n if Q % tiles.n == 0 else 128
    grid = (E * (P // block_p) * (Q // block_q),)
    _ragged_k_kernel[grid](
        a_RP.contiguous(), b_RQ.contiguous(), c_EPQ, c_EPQ if sum_a_EP is None else sum_a_EP,
        c_EPQ if sum_b_EQ is None else sum_b_EQ, counts_E, E, P, Q, SUM_A=sum_a, SUM_B=sum_b,
        EP=_experts_pow2(E), BP=block_p, BQ=block_q, BK=tiles.k, num_warps=tiles.warps, num_stages=tiles.stages)
    return c_EPQ, sum_a_EP, sum_b_EQ


@functools.lru_cache(maxsize=None)
def _move_launch_shape(E: int, P: int, Q: int, tiles: Tiles) -> tuple[tuple[str, object], ...]:
    """The keyword arguments of a ``_ragged_k_move_kernel`` launch, as items (see _rows_launch_shape)."""
    block_p = tiles.m if P % tiles.m == 0 else 128
    block_q = tiles.n if Q % tiles.n == 0 else 128
    return tuple(dict(EP=_experts_pow2(E), BP=block_p, BQ=block_q, BK=tiles.k, num_warps=tiles.warps,
                      num_stages=tiles.stages).items())


def ragged_k_move_variants(device: int | None, E: int, P: int, Q: int) -> list[int]:
    """The registered variants (extension ids) of ``ragged_k_move`` on ``device`` for [E, P, Q]
    weight gradients."""
    return _ragged_k_move_launches.variants(device, _move_launch_shape(E, P, Q, RAGGED_TILES))


def ragged_k_move(c_EPQ: Tensor, a_SP: Tensor, b_SQ: Tensor, rows_R: Tensor, remove_E: Tensor, add_E: Tensor,
                  tiles: Tiles = RAGGED_TILES) -> Tensor:
    """Moves rows' contributions between experts' weight gradients, in place:
    c_EPQ[e] -= a[rows removed from e]^T b[same rows], c_EPQ[e] += a[rows added to e]^T b[same rows],
    where the rows removed from e are rows_R[offsets of remove_E] and those added to e
    rows_R[offsets of add_E] (the same rows, grouped two ways). No expert may both lose and gain rows (each
    tile is read and written by one program). Experts with neither are not touched. No autograd."""
    E, P, Q = remove_E.numel(), a_SP.shape[1], b_SQ.shape[1]
    if P % 128 or Q % 128:
        raise ValueError(f"a and b need multiples of 128 columns (unmasked tiles), got {P} and {Q}")
    launch = dict(_move_launch_shape(E, P, Q, tiles))
    programs = min(_sm_count(a_SP.device), 2 * E * (P // launch["BP"]) * (Q // launch["BQ"]))
    _ragged_k_move_launches(programs, a_SP, b_SQ, c_EPQ, remove_E, add_E, rows_R, E, P, Q, programs, **launch)
    return c_EPQ


def gathered_fc1_blocker(x_TD: Tensor, w1_EHD: Tensor, b1_EH: Tensor | None, is_relu: bool) -> str | None:
    """Why the gathered Triton first GEMM cannot serve this first expert matrix, or None."""
    reason = kernel_blocker(x_TD, (w1_EHD, b1_EH), reduced=(w1_EHD.shape[2],), produced=(w1_EHD.shape[1],))
    if reason is not None:
        return reason
    if not is_relu:
        return "activation is not relu (the only epilogue wired)"
    if w1_EHD.shape[1] * w1_EHD.shape[2] > MAX_EXPERT_WEIGHTS:
        H, D = w1_EHD.shape[1:]
        return f"experts of {H}x{D} weights: grouped_mm is not slower there (measured)"
    return None


def kernel_blocker(x: Tensor, weights: tuple[Tensor | None, ...], reduced: tuple[int, ...] = (),
                   produced: tuple[int, ...] = ()) -> str | None:
    """Why these kernels cannot take tokens ``x`` with these weights, or None. ``reduced``: dims a
    GEMM sums over (multiples of the 64-wide reduction step: no masked loads along them);
    ``produced``: output columns (multiples of 128, the narrowest column tile)."""
    if triton is None:
        return "triton is not importable"
    if not x.is_cuda or torch.cuda.get_device_capability(x.device) < (9, 0):
        return "needs a CUDA GPU of compute capability 9.0 or newer"
    if any(t is not None and t.dtype != torch.bfloat16 for t in (x, *weights)):
        return "tokens and weights must be bfloat16"
    if any(d % 64 for d in reduced) or any(d % 128 for d in produced):
        return (f"summed dims must be multiples of 64 and output dims of 128, got {tuple(reduced)} and "
                f"{tuple(produced)}")
    if any(t is not None and not t.is_contiguous() for t in weights):
        return "non-contiguous expert weights"
    return None


def gathered_fc1_relu(x_TD: Tensor, inv_R: Tensor, top_k: int, counts_E: Tensor, w1_EHD: Tensor,
                      b1_EH: Tensor | None) -> Tensor:
    """h_RH[r] = relu(x_TD[inv_R[r] // top_k] @ w1_EHD[e(r)]^T + b1_EH[e(r)]) over the grouped rows
    (expert e owns counts_E[e] consecutive rows). No autograd; check the blocker first. The variant
    that ran is registered with the extension (``gathered_fc1_variants``)."""
    return _launch_grouped_rows(x_TD, counts_E, w1_EHD, True, b1_EH, inv_R, top_k, EPILOGUE_RELU, None, None,
                                ROWS_TILES)


def rows_variants(device: int | None, b_E: Tensor, transpose_b: bool, *, gather: bool, scatter: int, bias: bool,
                  epilogue: int) -> list[int]:
    """The extension's ids of the compiled variants of ``grouped_rows_mm`` launches over weights
    ``b_E`` (as that function takes them) with these options on ``device``, registered by its
    launches so far: a native call launches the first that fits its own arguments
    (``native/triton_rows.h``)."""
    N, KD = (b_E.shape[1], b_E.shape[2]) if transpose_b else (b_E.shape[2], b_E.shape[1])
    shape = _rows_launch_shape(b_E.shape[0], N, KD, gather, scatter, bias, epilogue, ROWS_TILES)
    return _grouped_rows_launches.variants(device, shape)


def gathered_fc1_variants(x_TD: Tensor, w1_EHD: Tensor, b1_EH: Tensor | None) -> list[int]:
    """``rows_variants`` of ``gathered_fc1_relu`` for these weights on x's device."""
    return rows_variants(x_TD.device.index, w1_EHD, True, gather=True, scatter=SCATTER_NONE, bias=b1_EH is not None,
                         epilogue=EPILOGUE_RELU)


def slot_fixups(x: Tensor, h_SH: Tensor, y_SO: Tensor | None, w1_EHD: Tensor, b1_EH: Tensor | None, w2_EHO: Tensor,
                top_k: int, over_E: Tensor, rows_O: Tensor, choice_O: Tensor | None, *, second: bool) -> None:
    """The rows of a dropless no-grad forward in capacity slots that overflowed into other experts'
    slots, recomputed with their own expert's weights, in place (``native/layer_forward.h``,
    slotted layouts; the cuBLAS GEMMs computed them with the slot owner's). ``second`` False:
    h_SH[rows_O[g]] = relu(x[row] @ w1^T + b1) of their expert, the row x_TD[choice_O[g] // top_k]
    when ``choice_O`` is given (x holds the tokens: gathered first GEMM), else x_SD[rows_O[g]] (x
    holds the dispatched slots, top_k 1); True: y_SO[rows_O[g]] = h_SH[rows_O[g]] @ w2 of their
    expert (after the batched second GEMM)."""
    if second:
        grouped_rows_mm(h_SH, over_E, w2_EHO, False, gather_R=rows_O, top_k=1, out=y_SO)
    elif choice_O is None:
        grouped_rows_mm(x, over_E, w1_EHD, True, bias_EN=b1_EH, gather_R=rows_O, top_k=1, epilogue=EPILOGUE_RELU,
                        out=h_SH)
    else:
        grouped_rows_mm(x, over_E, w1_EHD, True, bias_EN=b1_EH, gather_R=choice_O, top_k=top_k,
                        epilogue=EPILOGUE_RELU, out=h_SH, scatter_R=rows_O)


def slot_fixup_variants(x_TD: Tensor, w1_EHD: Tensor, b1_EH: Tensor | None, w2_EHO: Tensor,
                        gathered: bool = True) -> tuple[list[int], list[int]]:
    """``rows_variants`` of ``slot_fixups``' two launches on x's device (``gathered``: the first
    one reads the tokens through choice_O)."""
    device = x_TD.device.index
    first = rows_variants(device, w1_EHD, True, gather=True, scatter=SCATTER_INDEXED if gathered else SCATTER_GATHERED,
                          bias=b1_EH is not None, epilogue=EPILOGUE_RELU)
    return first, rows_variants(device, w2_EHO, False, gather=True, scatter=SCATTER_GATHERED, bias=False,
                                epilogue=EPILOGUE_NONE)


def is_available() -> bool:
    return triton is not None


__all__ = ["EPILOGUE_NONE", "EPILOGUE_RELU", "EPILOGUE_RELU_GRAD", "MAX_EXPERT_WEIGHTS", "TOLERANCE", "Tiles",
           "gathered_fc1_blocker", "gathered_fc1_relu", "gathered_fc1_variants", "grouped_rows_mm", "is_available", "kernel_blocker",
           "ragged_k_mm", "ragged_k_move", "ragged_k_move_variants", "rows_variants", "slot_fixup_variants", "slot_fixups"]
