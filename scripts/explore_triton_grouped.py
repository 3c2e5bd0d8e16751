"""Exploration (device machine): a Triton grouped GEMM that gathers its A rows straight from the
tokens (no dispatch pass) and applies relu in its epilogue, against what the layer runs today.

    python3 scripts/explore_triton_grouped.py [fine64 dsv3 mixtral]

Not product code: it answers "would a ragged GEMM of our own close the dropless gap?" (issue #3).
Per config, balanced routing (every expert T*k/E rows), bf16, GPU time per call (CUDA events
around 20 back-to-back calls, median of 5), the first FFN matrix only (fc1 + relu):
  dispatch + grouped_mm + relu_ : the layer's dropless path today
  dispatch + bmm(relu epilogue)   : the layer's cf=1 path today (padded rows, cuBLASLt)
  triton gathered fc1+relu        : rows gathered in the A-load, relu in the epilogue
It times the shipped kernel (adaptmoe.ops._triton_gemm) at several tile shapes. The logged run
(h100_explore_triton_grouped.log) used this script's own earlier copy of that kernel, which found
each tile's expert from a tile map built with torch ops instead of from the counts in registers.

Legend: T tokens, D model dim, H hidden, E experts, K top-k, R = T*K grouped rows.
"""
from __future__ import annotations

import sys

import torch
import triton

from adaptmoe import ops
from adaptmoe.examples.timing import pipelined_ms
from adaptmoe.ops import _native, _triton_gemm

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
    choice_of_row = torch.empty(R, device=dev, dtype=torch.int32)   # row -> choice t*K + k
    choice_of_row[slots.reshape(-1)] = torch.arange(R, device=dev, dtype=torch.int32)
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
    print(f"  dispatch + grouped_mm + relu_      {pipelined_ms(dropless_today):7.3f}")
    print(f"  dispatch + bmm (relu epilogue)     {pipelined_ms(cf1_today):7.3f}")
    x_rows = ops.dispatch(x, slots, R)
    print(f"  grouped_mm alone (rows dispatched) {pipelined_ms(lambda: torch._grouped_mm(x_rows, w1.transpose(1, 2), offs=row_end)):7.3f}")
    print(f"  bmm relu-epilogue alone            {pipelined_ms(lambda: native.bmm_nt_act(x_rows.view(E, C, D), w1, None, 1, False)):7.3f}")
    print(f"  dispatch alone                     {pipelined_ms(lambda: ops.dispatch(x, slots, R)):7.3f}")
    for BM, BN, BK, warps, stages in TILES:
        h = torch.empty(R, H, device=dev, dtype=bf)
        grid = (triton.cdiv(R, BM) + E, H // BN)

        def tri(BM=BM, BN=BN, BK=BK, warps=warps, stages=stages, h=h, grid=grid):
            # the shipped kernel (ops._triton_gemm), at this tile shape
            _triton_gemm._gathered_fc1_relu_kernel[grid](
                x, choice_of_row, w1, w1, h, counts, E, K, D, H, HAS_BIAS=False,
                EP=max(16, triton.next_power_of_2(E)), BM=BM, BN=BN, BK=BK, num_warps=warps, num_stages=stages)
            return h
        try:
            out = tri()
            # grouped row order (dropless) vs padded cf=1 order: the same rows when balanced
            err = (out.float() - ref).abs().max().item()
            print(f"  triton gathered BM={BM} BN={BN} BK={BK} w={warps} s={stages}  {pipelined_ms(tri):7.3f}"
                  f"   max |diff| vs cuBLAS {err:.3g}")
        except Exception as exc:   # an exploration: report and go on
            print(f"  triton BM={BM} BN={BN} failed: {str(exc)[:200]}")


def main() -> None:
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    for name in sys.argv[1:] or ["fine64", "dsv3", "mixtral"]:
        run(name)


if __name__ == "__main__":
    main()
