"""Exploration (device machine): the Triton grouped GEMMs with their operands loaded through TMA
tensor descriptors, against the shipped pointer-load kernels (``adaptmoe.ops._triton_gemm``),
torch._grouped_mm and cuBLAS bmm.

    python3 scripts/explore_triton_tma.py [fine64 dsv3 mixtral]

Not product code: it asks whether TMA loads close the gap between our Triton kernels and cuBLAS
(issue #3; ``native/NOTES.md``, sixth session). Balanced counts, bf16, GPU ms per call (CUDA
events around 20 back-to-back calls, median of 5). Row kernel: an m-tile may read rows of the
next expert (outputs are per row, and rows past the expert's end are not stored), so A loads are
plain 2-D boxes. Ragged-K kernel: the last partial step of an expert's rows is zeroed in registers.

Legend: T tokens, D model dim, H hidden, E experts, K top-k, R = T*K grouped rows, C = R/E.
"""
from __future__ import annotations

import sys
from types import SimpleNamespace

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from adaptmoe.examples.timing import pipelined_ms
from adaptmoe.ops import _triton_gemm as tg

CONFIGS = {
    "fine64": dict(T=8192, D=2048, H=1024, E=64, K=8),
    "dsv3": dict(T=16384, D=7168, H=2048, E=256, K=8),
    "mixtral": dict(T=8192, D=4096, H=14336, E=8, K=2),
}
TILES = [tg.Tiles(128, 256, 64, 8, 4), tg.Tiles(128, 256, 64, 8, 3)]


@triton.jit
def _rows_tma_kernel(a_desc, b_desc, c_ptr, counts_ptr, E, N, KD, N_TILES: tl.constexpr,
                     TRANS_B: tl.constexpr, RELU: tl.constexpr, EP: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m = tl.program_id(0) // N_TILES
    pid_n = tl.program_id(0) % N_TILES
    e, row_stop, first_row = tg._expert_of_tile(counts_ptr, E, pid_m, EP, BM)
    if e >= E:
        return
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, KD, BK):
        a = a_desc.load([first_row.to(tl.int32), k0])
        if TRANS_B:
            b = b_desc.load([e, pid_n * BN, k0]).reshape(BN, BK)
            acc = tl.dot(a, tl.trans(b), acc)
        else:
            b = b_desc.load([e, k0, pid_n * BN]).reshape(BK, BN)
            acc = tl.dot(a, b, acc)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    rows = first_row + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    tl.store(c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=(rows < row_stop)[:, None])


@triton.jit
def _ragged_tma_kernel(a_desc, b_desc, c_ptr, counts_ptr, E, P, Q, EP: tl.constexpr,
                       BP: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    tiles_p = P // BP
    tiles_q = Q // BQ
    e = pid // (tiles_p * tiles_q)
    pid_p = (pid % (tiles_p * tiles_q)) // tiles_q
    pid_q = pid % tiles_q
    experts = tl.arange(0, EP)
    counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
    row_start = tl.sum(tl.where(experts < e, counts, 0), 0).to(tl.int32)
    count = tl.sum(tl.where(experts == e, counts, 0), 0).to(tl.int32)
    acc = tl.zeros((BP, BQ), dtype=tl.float32)
    full_steps = count // BK
    for k in range(0, full_steps):
        a = a_desc.load([row_start + k * BK, pid_p * BP])
        b = b_desc.load([row_start + k * BK, pid_q * BQ])
        acc = tl.dot(tl.trans(a), b, acc)
    if count % BK != 0:
        k0 = full_steps * BK
        in_rows = (k0 + tl.arange(0, BK)) < count
        a = tl.where(in_rows[:, None], a_desc.load([row_start + k0, pid_p * BP]), 0.0)
        b = tl.where(in_rows[:, None], b_desc.load([row_start + k0, pid_q * BQ]), 0.0)
        acc = tl.dot(tl.trans(a), b, acc)
    ps = pid_p * BP + tl.arange(0, BP)
    qs = pid_q * BQ + tl.arange(0, BQ)
    tl.store(c_ptr + e.to(tl.int64) * P * Q + ps[:, None].to(tl.int64) * Q + qs[None, :],
             acc.to(c_ptr.dtype.element_ty))


def rows_tma(a, counts, b, trans_b: bool, relu: bool, t: tg.Tiles):
    E = b.shape[0]
    N, KD = (b.shape[1], b.shape[2]) if trans_b else (b.shape[2], b.shape[1])
    R = a.shape[0]
    c = torch.empty(R, N, device=a.device, dtype=a.dtype)
    a_desc = TensorDescriptor.from_tensor(a, [t.m, t.k])
    b_desc = TensorDescriptor.from_tensor(b, [1, t.n, t.k] if trans_b else [1, t.k, t.n])
    grid = ((triton.cdiv(R, t.m) + E) * (N // t.n),)
    _rows_tma_kernel[grid](a_desc, b_desc, c, counts, E, N, KD, N_TILES=N // t.n, TRANS_B=trans_b, RELU=relu,
                           EP=max(16, triton.next_power_of_2(E)), BM=t.m, BN=t.n, BK=t.k,
                           num_warps=t.warps, num_stages=t.stages)
    return c


def ragged_tma(a, b, counts, t: tg.Tiles):
    E, P, Q = counts.numel(), a.shape[1], b.shape[1]
    c = torch.empty(E, P, Q, device=a.device, dtype=a.dtype)
    a_desc = TensorDescriptor.from_tensor(a, [t.k, t.m])
    b_desc = TensorDescriptor.from_tensor(b, [t.k, t.n])
    grid = (E * (P // t.m) * (Q // t.n),)
    _ragged_tma_kernel[grid](a_desc, b_desc, c, counts, E, P, Q, EP=max(16, triton.next_power_of_2(E)),
                             BP=t.m, BQ=t.n, BK=t.k, num_warps=t.warps, num_stages=t.stages)
    return c


def _row(label: str, ms: float, flops: float, err: float | None = None) -> None:
    extra = "" if err is None else f"   max|diff| {err:.3g}"
    print(f"  {label:<40} {ms:8.3f} ms {flops / ms / 1e9:7.1f} TF/s{extra}", flush=True)


def operands(T: int, D: int, H: int, E: int, K: int, uneven: bool) -> SimpleNamespace:
    """bf16 rows, weights and per-expert counts of one config (balanced; with ``uneven`` the first
    and last expert differ by 40 rows: partial tiles and a partial last reduction step)."""
    bf, dev = torch.bfloat16, "cuda"
    R, C = T * K, T * K // E
    torch.manual_seed(0)
    x = torch.randn(R, D, device=dev, dtype=bf)
    w1 = torch.randn(E, H, D, device=dev, dtype=bf) / D ** 0.5
    w2 = torch.randn(E, H, D, device=dev, dtype=bf) / H ** 0.5
    counts = torch.full((E,), C, device=dev, dtype=torch.int64)
    if uneven:
        counts[0], counts[-1] = C - 40, C + 40
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    h = torch.relu(torch._grouped_mm(x, w1.transpose(1, 2), offs=offs))
    return SimpleNamespace(x=x, w1=w1, w2=w2, counts=counts, offs=offs, h=h, C=C, flops=2.0 * R * D * H)


def compare(label: str, reference, shipped, variants: dict, flops: float) -> None:
    """Times ``reference()``, then per tile shape the shipped kernel ``shipped(tiles)`` and each
    variant ``variants[name](tiles)``, with the variant's max |diff| from the shipped output."""
    _row(f"{label} reference", pipelined_ms(reference), flops)
    for t in TILES:
        want = shipped(t).float()
        _row(f"{label} shipped {tuple(t)}", pipelined_ms(lambda t=t: shipped(t)), flops)
        for name, variant in variants.items():
            try:
                err = (variant(t).float() - want).abs().max().item()
                _row(f"{label} {name} {tuple(t)}", pipelined_ms(lambda t=t, v=variant: v(t)), flops, err)
            except Exception as exc:   # an exploration: report and go on
                print(f"  {label} {name} {tuple(t)} failed: {str(exc)[:300]}", flush=True)


def run(name: str, T: int, D: int, H: int, E: int, K: int) -> None:
    o = operands(T, D, H, E, K, uneven=True)
    print(f"\n=== {name} T={T} D={D} H={H} E={E} k={K}", flush=True)
    compare("fc1+relu", lambda: torch.bmm(o.x.view(E, o.C, D), o.w1.transpose(1, 2)),
            lambda t: tg.grouped_rows_mm(o.x, o.counts, o.w1, True, epilogue=tg.EPILOGUE_RELU, tiles=t),
            {"tma": lambda t: rows_tma(o.x, o.counts, o.w1, True, True, t)}, o.flops)
    compare("fc2", lambda: torch.bmm(o.h.view(E, o.C, H), o.w2),
            lambda t: tg.grouped_rows_mm(o.h, o.counts, o.w2, False, tiles=t),
            {"tma": lambda t: rows_tma(o.h, o.counts, o.w2, False, False, t)}, o.flops)
    compare("dW1 (reference: grouped_mm)", lambda: torch._grouped_mm(o.h.t(), o.x, offs=o.offs),
            lambda t: tg.ragged_k_mm(o.h, o.x, o.counts, tiles=t)[0],
            {"tma": lambda t: ragged_tma(o.h, o.x, o.counts, t)}, o.flops)


def main() -> None:
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    for name in sys.argv[1:] or list(CONFIGS):
        run(name, **CONFIGS[name])


if __name__ == "__main__":
    main()
