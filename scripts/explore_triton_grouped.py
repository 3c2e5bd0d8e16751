"""Exploration (device machine): a Triton grouped GEMM that gathers its A rows straight from the
tokens (no dispatch pass) and applies relu in its epilogue, against what the layer runs today.

    python3 scripts/explore_triton_grouped.py [fine64 dsv3 mixtral]

Not product code: it answers "would a ragged GEMM of our own close the dropless gap?" (issue #3).
Per config, balanced routing (every expert T*k/E rows), bf16, GPU time per call (CUDA events
around 20 back-to-back calls, median of 5), the first FFN matrix only (fc1 + relu):
  dispatch + grouped_mm + relu_ : the layer's dropless path today
  dispatch + bmm(relu epilogue)   : the layer's cf=1 path today (padded rows, cuBLASLt)
  triton gathered fc1+relu        : rows gathered in the A-load, relu in the epilogue
Triton ships with torch's CUDA wheels (torch's own compiler uses it); nothing here is imported by
the package.

Legend: T tokens, D model dim, H hidden, E experts, K top-k, R = T*K grouped rows.
"""
from __future__ import annotations

import statistics
import sys

import torch
import triton
import triton.language as tl

from adaptmoe import ops
from adaptmoe.ops import _native

CONFIGS = {
    "fine64": dict(T=8192, D=2048, H=1024, E=64, K=8),
    "dsv3": dict(T=16384, D=7168, H=2048, E=256, K=8),
    "mixtral": dict(T=8192, D=4096, H=14336, E=8, K=2),
}
TILES = [  # BM, BN, BK, warps, stages
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (64, 256, 64, 8, 3),
]


@triton.jit
def gathered_fc1_relu(x_ptr, token_ptr, w_ptr, h_ptr, row_end_ptr, tile_end_ptr, tile_expert_ptr,
                      D, H, E,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """h[r, n] = relu(sum_d x[token[r], d] * w[e(r), n, d]) over grouped rows r (expert-major)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e >= E:
        return
    tile_start = tl.where(e > 0, tl.load(tile_end_ptr + e - 1, mask=e > 0, other=0), 0)
    row_start = tl.where(e > 0, tl.load(row_end_ptr + e - 1, mask=e > 0, other=0), 0)
    row_end = tl.load(row_end_ptr + e)
    rows = row_start + (pid_m - tile_start) * BM + tl.arange(0, BM)
    in_rows = rows < row_end
    tokens = tl.load(token_ptr + rows, mask=in_rows, other=0).to(tl.int64)
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
    acc = tl.maximum(acc, 0.0)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * H + cols[None, :]
    tl.store(h_ptrs, acc.to(tl.bfloat16), mask=in_rows[:, None])


def gpu_ms(fn, calls: int = 20, reps: int = 5) -> float:
    for _ in range(3):
        fn()
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / calls)
    return statistics.median(samples)


def balanced_routing(T: int, E: int, K: int, device: str) -> torch.Tensor:
    """indices_TK where every expert gets exactly T*K/E choices and no token repeats an expert."""
    return ((torch.arange(T, device=device)[:, None] * K + torch.arange(K, device=device)[None, :]) % E)


def run(name: str) -> None:
    cfg = CONFIGS[name]
    T, D, H, E, K = (cfg[k] for k in ("T", "D", "H", "E", "K"))
    dev, bf = "cuda", torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(T, D, device=dev, dtype=bf)
    w1 = torch.randn(E, H, D, device=dev, dtype=bf) / D ** 0.5
    idx = balanced_routing(T, E, K, dev)
    _, counts, slots = ops.assign_slots(idx, E, None)          # dropless: grouped row of each choice
    R = T * K
    token_of_row = torch.empty(R, device=dev, dtype=torch.int32)
    token_of_row[slots.reshape(-1)] = torch.arange(T, device=dev, dtype=torch.int32).repeat_interleave(K)
    row_end = torch.cumsum(counts, 0).to(torch.int32)
    C = R // E
    _, counts_c, slots_c = ops.assign_slots(idx, E, C)         # cf=1 slots (balanced: nothing dropped)
    native = _native.loaded()

    def dropless_today():
        x_RD = ops.dispatch(x, slots, R)
        return torch._grouped_mm(x_RD, w1.transpose(1, 2), offs=row_end).relu_()

    def cf1_today():
        x_RD = ops.dispatch(x, slots_c, E * C)
        return native.bmm_nt_act(x_RD.view(E, C, D), w1, None, 1, False)

    ref = cf1_today().reshape(R, H).float()
    print(f"\n=== {name} T={T} D={D} H={H} E={E} k={K}: fc1 + relu, GPU ms per call")
    print(f"  dispatch + grouped_mm + relu_      {gpu_ms(dropless_today):7.3f}")
    print(f"  dispatch + bmm (relu epilogue)     {gpu_ms(cf1_today):7.3f}")
    x_rows = ops.dispatch(x, slots, R)
    print(f"  grouped_mm alone (rows dispatched) {gpu_ms(lambda: torch._grouped_mm(x_rows, w1.transpose(1, 2), offs=row_end)):7.3f}")
    print(f"  bmm relu-epilogue alone            {gpu_ms(lambda: native.bmm_nt_act(x_rows.view(E, C, D), w1, None, 1, False)):7.3f}")
    print(f"  dispatch alone                     {gpu_ms(lambda: ops.dispatch(x, slots, R)):7.3f}")
    for BM, BN, BK, warps, stages in TILES:
        tile_counts = (counts + BM - 1) // BM
        tile_end = torch.cumsum(tile_counts, 0).to(torch.int32)
        max_tiles = R // BM + E
        tile_expert = torch.searchsorted(tile_end, torch.arange(max_tiles, device=dev, dtype=torch.int32),
                                         right=True).to(torch.int32)
        h = torch.empty(R, H, device=dev, dtype=bf)
        grid = (max_tiles, H // BN)

        def tri(BM=BM, BN=BN, BK=BK, warps=warps, stages=stages, tile_end=tile_end, tile_expert=tile_expert,
                h=h, grid=grid):
            gathered_fc1_relu[grid](x, token_of_row, w1, h, row_end, tile_end, tile_expert, D, H, E,
                                    BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
            return h
        try:
            out = tri()
            # grouped row order (dropless) vs padded cf=1 order: the same rows when balanced
            err = (out.float() - ref).abs().max().item()
            print(f"  triton gathered BM={BM} BN={BN} BK={BK} w={warps} s={stages}  {gpu_ms(tri):7.3f}"
                  f"   max |diff| vs cuBLAS {err:.3g}")
        except Exception as exc:   # an exploration: report and go on
            print(f"  triton BM={BM} BN={BN} failed: {str(exc)[:200]}")


def main() -> None:
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    for name in sys.argv[1:] or ["fine64", "dsv3", "mixtral"]:
        run(name)


if __name__ == "__main__":
    main()
