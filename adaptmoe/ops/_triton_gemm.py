"""Grouped first expert GEMM in Triton that gathers its rows straight from the tokens and applies
the relu (and bias) in its epilogue: the dropless no-grad forward of fine-grained experts.

Legend: T tokens, D model dim, H hidden, E experts, K top-k, R = T*K grouped rows (expert-major).

Why: the dropless path otherwise dispatches the T*K rows (one write + read of R x D), runs
``torch._grouped_mm`` (no epilogue) and then a relu pass over R x H. On an H100 (bf16, balanced
routing, ``scripts/explore_triton_grouped.py``, ``h100_explore_triton_grouped.log``) this kernel
did fine-grained's fc1 (T=8192, D=2048, H=1024, E=64, k=8) in 0.447 ms against 0.626 ms for that
chain and 0.523 ms for the capacity-padded cf=1 chain (dispatch + cuBLASLt GEMM with relu
epilogue); on DeepSeek-V3's (D=7168, H=2048) and Mixtral's (D=4096, H=14336) experts it was 4-5%
slower than the chain, so it serves experts of at most ``MAX_EXPERT_WEIGHTS`` elements per matrix.

Triton ships with torch's CUDA wheels (it is torch.compile's code generator); where it cannot be
imported this path is not taken, and ``gathered_fc1_blocker`` says so.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:   # CPU wheels, other platforms: the grouped_mm path serves instead
    triton = None

# (rtol, atol) against the float64 reference of the same inputs: fp32 accumulation, one bf16
# rounding of the output (the bias is added before it, unlike the grouped_mm chain).
TOLERANCE = (2e-2, 2e-2)
# H*D of one expert's first matrix; fine-grained 2048x1024 wins, 7168x2048 and 4096x14336 lose.
MAX_EXPERT_WEIGHTS = 1 << 22
_BLOCK_M, _BLOCK_K = 128, 64


if triton is not None:
    @triton.jit
    def _gathered_fc1_relu_kernel(x_ptr, inv_ptr, w_ptr, b_ptr, h_ptr, counts_ptr, E, K, D, H,
                                  HAS_BIAS: tl.constexpr, EP: tl.constexpr,
                                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        # Program (m-tile, n-tile) over the experts' row tiles laid end to end; the expert of an
        # m-tile comes from the counts (tiles per expert, prefix sums in registers): no host sync.
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        experts = tl.arange(0, EP)
        counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
        tiles = (counts + BM - 1) // BM
        tile_end = tl.cumsum(tiles, 0)
        row_end = tl.cumsum(counts, 0)
        e = tl.sum((tile_end <= pid_m).to(tl.int32), 0)
        if e >= E:
            return
        mine = experts == e
        tile_start = tl.sum(tl.where(mine, tile_end - tiles, 0), 0)
        row_start = tl.sum(tl.where(mine, row_end - counts, 0), 0)
        row_stop = tl.sum(tl.where(mine, row_end, 0), 0)
        rows = row_start + (pid_m - tile_start) * BM + tl.arange(0, BM)
        in_rows = rows < row_stop
        tokens = (tl.load(inv_ptr + rows, mask=in_rows, other=0) // K).to(tl.int64)
        cols = pid_n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        a_ptrs = x_ptr + tokens[:, None] * D + ks[None, :]
        b_ptrs = w_ptr + e.to(tl.int64) * H * D + cols[None, :].to(tl.int64) * D + ks[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, tl.cdiv(D, BK)):
            a = tl.load(a_ptrs, mask=in_rows[:, None], other=0.0)
            b = tl.load(b_ptrs)
            acc = tl.dot(a, b, acc)
            a_ptrs += BK
            b_ptrs += BK
        if HAS_BIAS:
            acc += tl.load(b_ptr + e.to(tl.int64) * H + cols).to(tl.float32)[None, :]
        acc = tl.maximum(acc, 0.0)
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * H + cols[None, :]
        tl.store(h_ptrs, acc.to(tl.bfloat16), mask=in_rows[:, None])


def gathered_fc1_blocker(x_TD: Tensor, w1_EHD: Tensor, b1_EH: Tensor | None, is_relu: bool) -> str | None:
    """Why the gathered Triton GEMM cannot serve this first expert matrix, or None."""
    if triton is None:
        return "triton is not importable"
    if not x_TD.is_cuda or torch.cuda.get_device_capability(x_TD.device) < (9, 0):
        return "needs a CUDA GPU of compute capability 9.0 or newer"
    if not is_relu:
        return "activation is not relu (the only epilogue wired)"
    if any(t is not None and t.dtype != torch.bfloat16 for t in (x_TD, w1_EHD, b1_EH)):
        return "tokens and weights must be bfloat16"
    E, H, D = w1_EHD.shape
    if D % _BLOCK_K or H % 128:
        return f"D must be a multiple of {_BLOCK_K} and H of 128, got D={D}, H={H}"
    if H * D > MAX_EXPERT_WEIGHTS:
        return f"experts of {H}x{D} weights: on large experts grouped_mm is faster (measured)"
    if not w1_EHD.is_contiguous() or (b1_EH is not None and not b1_EH.is_contiguous()):
        return "non-contiguous expert weights"
    return None


def gathered_fc1_relu(x_TD: Tensor, inv_R: Tensor, top_k: int, counts_E: Tensor, w1_EHD: Tensor,
                      b1_EH: Tensor | None) -> Tensor:
    """h_RH[r] = relu(x_TD[inv_R[r] // top_k] @ w1_EHD[e(r)]^T + b1_EH[e(r)]) over the grouped rows
    (expert e owns counts_E[e] consecutive rows). No autograd; check the blocker first."""
    E, H, D = w1_EHD.shape
    R = inv_R.numel()
    h_RH = torch.empty(R, H, device=x_TD.device, dtype=torch.bfloat16)
    if R == 0:
        return h_RH
    block_n = 256 if H % 256 == 0 else 128
    grid = (triton.cdiv(R, _BLOCK_M) + E, H // block_n)
    _gathered_fc1_relu_kernel[grid](
        x_TD.contiguous(), inv_R, w1_EHD, b1_EH if b1_EH is not None else w1_EHD, h_RH, counts_E, E, top_k, D, H,
        HAS_BIAS=b1_EH is not None, EP=max(16, triton.next_power_of_2(E)), BM=_BLOCK_M, BN=block_n, BK=_BLOCK_K,
        num_warps=8, num_stages=3)
    return h_RH


def is_available() -> bool:
    return triton is not None


__all__ = ["MAX_EXPERT_WEIGHTS", "TOLERANCE", "gathered_fc1_blocker", "gathered_fc1_relu", "is_available"]
