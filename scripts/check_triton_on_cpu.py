"""Checks of the Triton kernels on a machine without a GPU (developer tool, not CI: triton is not
a dependency of the CPU install).

    pip install --target /tmp/tritonlib triton==3.6.0      # the wheel torch's CUDA builds use
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/tritonlib:. python scripts/check_triton_on_cpu.py interpret
    TRITON_INTERPRET=1 PYTHONPATH=/tmp/tritonlib:. python scripts/check_triton_on_cpu.py slotted
    PYTHONPATH=/tmp/tritonlib:. python scripts/check_triton_on_cpu.py compile

interpret: runs the shipped kernels (``adaptmoe.ops._triton_gemm``, ``_triton_ffn``) and the
persistent exploration variants in Triton's interpreter on fp32 CPU tensors (its bfloat16 is
wrong) against float64 per-expert references: forward, every gradient, gathered rows.
compile: compiles them for sm90 ahead of time (ptxas ships in the wheel) and prints each one's
shared memory, which shows whether the loop was software-pipelined (a 128x256x64 bf16 stage is
48 KiB). Triton 3.6 under numpy 2 needs ``int(self.handle.data)`` in
``triton/runtime/interpreter.py`` changed to ``int(self.handle.data.reshape(-1)[0])``.
"""
from __future__ import annotations

import sys

import torch

from adaptmoe.ops import _triton_ffn
from adaptmoe.ops import _triton_gemm as tg

COUNTS = [30, 70, 0, 28]   # partial tiles, an expert with no rows, a partial last reduction step


def _per_expert(fn) -> list[torch.Tensor]:
    start, out = 0, []
    for e, n in enumerate(COUNTS):
        out.append(fn(e, slice(start, start + n)))
        start += n
    return out


def interpret() -> None:
    import scripts.explore_triton_persistent as persistent
    torch.manual_seed(0)
    E, D, H = len(COUNTS), 128, 128
    counts, R = torch.tensor(COUNTS), sum(COUNTS)
    x = torch.randn(R, D, requires_grad=True)
    w1 = (torch.randn(E, H, D) / D ** 0.5).requires_grad_()
    b1 = torch.randn(E, H, requires_grad=True)
    w2 = (torch.randn(E, H, D) / H ** 0.5).requires_grad_()
    b2 = torch.randn(E, D, requires_grad=True)
    leaves, gy = [x, w1, b1, w2, b2], torch.randn(R, D)
    kernels = _triton_ffn.FFNKernels("triton", "triton")   # grouped_mm has no CPU kernel
    y = _triton_ffn.relu_ffn(x, counts, w1, b1, w2, b2, kernels)
    got = torch.autograd.grad(y, leaves, gy)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    y_ref = torch.cat(_per_expert(lambda e, s: torch.relu(ref[0][s] @ ref[1][e].t() + ref[2][e]) @ ref[3][e]
                                  + ref[4][e]))
    print(f"relu_ffn output: max |diff| {(y.double() - y_ref).abs().max().item():.3g}")
    for name, g, w in zip("x w1 b1 w2 b2".split(), got, torch.autograd.grad(y_ref, ref, gy.double())):
        print(f"relu_ffn grad {name}: max |diff| {(g.double() - w).abs().max().item():.3g}")
    t = tg.Tiles(32, 64, 32, 4, 2)
    a, w, wn, h = x.detach(), w1.detach(), torch.randn(E, D, H), torch.randn(R, H)
    for flatten in (False, True):
        diffs = [
            persistent.rows_persistent(a, counts, w, True, True, t, flatten)
            - tg.grouped_rows_mm(a, counts, w, True, epilogue=tg.EPILOGUE_RELU, tiles=t),
            persistent.rows_persistent(a, counts, wn, False, False, t, flatten)
            - tg.grouped_rows_mm(a, counts, wn, False, tiles=t),
            persistent.ragged_persistent(h, a, counts, t, flatten) - tg.ragged_k_mm(h, a, counts, tiles=t)[0],
        ]
        print(f"persistent flatten={flatten} vs shipped: max |diff| {max(d.abs().max().item() for d in diffs):.3g}")
    tokens, inv = torch.randn(R // 2 + 1, D), torch.randperm(R)
    gathered = tg.grouped_rows_mm(tokens, counts, w, True, gather_R=inv, top_k=2, epilogue=tg.EPILOGUE_RELU, tiles=t)
    for group_m in (0, 1, 2):
        diffs = [persistent.rows_ordered(tokens, counts, w, True, True, t, group_m, inv, 2) - gathered,
                 persistent.rows_ordered(a, counts, wn, False, False, t, group_m)
                 - tg.grouped_rows_mm(a, counts, wn, False, tiles=t)]
        for flatten in (False, True):
            diffs.append(persistent.rows_persistent(tokens, counts, w, True, True, t, flatten, group_m, inv, 2)
                         - gathered)
        print(f"order group_m={group_m} (one program per tile, persistent) vs shipped: max |diff| "
              f"{max(d.abs().max().item() for d in diffs):.3g}")
    out = torch.full((2 * R, H), 7.0)   # indexed scatter: gathered rows into other rows of out
    scatter = torch.randperm(2 * R)[:R]
    tg.grouped_rows_mm(tokens, counts, w, True, gather_R=inv, top_k=2, epilogue=tg.EPILOGUE_RELU, out=out,
                       scatter_R=scatter, tiles=t)
    untouched = torch.ones(2 * R, dtype=torch.bool)
    untouched[scatter] = False
    print(f"indexed scatter vs gathered rows: max |diff| {(out[scatter] - gathered).abs().max().item():.3g}, "
          f"other rows kept: {bool((out[untouched] == 7.0).all())}")


def slotted() -> None:
    """The slot path (``ops._triton_slotted``) on skewed routing (overflow rows, experts with none)
    against a float64 loop over tokens and their experts: outputs and every gradient."""
    from adaptmoe.dispatch import combine_reference, dispatch_reference
    from adaptmoe.expert_compute import FFNWeights, ffn_slotted
    from adaptmoe.routing import build_routing, overflow_slots
    torch.manual_seed(0)
    T, E, K, D, H = 40, 4, 2, 128, 128
    idx_TK = (torch.randn(T, E) + torch.tensor([2.0, 1.0, 0.0, -3.0])).topk(K, dim=1).indices
    routing = build_routing(idx_TK, torch.rand(T, K), E, 0.0)
    layout = overflow_slots(routing, K * -(-T // E))
    x = torch.randn(T, D, requires_grad=True)
    w = [(torch.randn(E, H, D) / D ** 0.5).requires_grad_() for _ in range(3)]
    for gated in (False, True):
        weights = FFNWeights(w[0], w[1], w3_eHD=w[2] if gated else None)
        x_SD = dispatch_reference(x, layout.slots_TK, E * layout.capacity)
        y = combine_reference(ffn_slotted(x_SD, layout, weights, torch.relu), layout.slots_TK, routing.weights_TK)
        gy = torch.randn_like(y)
        got = torch.autograd.grad(y, [x, *w[:3 if gated else 2]], gy)
        ref = [t.detach().double().requires_grad_() for t in (x, *w)]
        y_ref = torch.zeros(T, D, dtype=torch.float64)
        for t in range(T):
            for j in range(K):
                e = int(idx_TK[t, j])
                h = torch.relu(ref[0][t] @ ref[1][e].t())
                if gated:
                    h = h * (ref[0][t] @ ref[3][e].t())
                y_ref[t] += float(routing.weights_TK[t, j]) * (h @ ref[2][e])
        want = torch.autograd.grad(y_ref, [ref[0], ref[1], ref[2]] + ([ref[3]] if gated else []), gy.double())
        diffs = [(y.double() - y_ref).abs().max().item()] + [(g.double() - r).abs().max().item()
                                                            for g, r in zip(got, want)]
        print(f"slotted ffn gated={gated}: overflow rows {layout.over_E.tolist()}, hosted {layout.hosted_E.tolist()}; "
              f"max |diff| output {diffs[0]:.3g}, grads {max(diffs[1:]):.3g}")


def compile_for_sm90() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import scripts.explore_triton_persistent as persistent
    aligned = ("KD", "N", "P", "Q", "stride_be", "stride_bn")

    def build(fn, signature: dict, constexprs: dict, stages: int) -> None:
        # pointers 16-byte aligned and sizes divisible by 16, as Triton specializes them at launch
        attrs = {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(signature.items())
                 if kind.startswith("*") or (kind == "i32" and name in aligned)}
        kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": stages})
        print(f"{fn.__name__} {constexprs.get('FLATTEN', '')} stages={stages}: shared {kernel.metadata.shared} B")

    ptrs = {name: "*bf16" for name in ("a_ptr", "b_ptr", "c_ptr")}
    tiles = {"EP": 64, "BK": 64}
    rows = {"a_ptr": "*bf16", "gather_ptr": "*i32", "b_ptr": "*bf16", "c_ptr": "*bf16", "counts_ptr": "*i64",
            "E": "i32", "TOP_K": "i32", "KD": "i32", "N": "i32", "stride_be": "i32", "stride_bk": "constexpr",
            "stride_bn": "i32", **{k: "constexpr" for k in (
                "N_TILES", "GATHER", "RELU", "FLATTEN", "GROUP_M", "NUM_PROGRAMS", "EP", "BM", "BN", "BK")}}
    ragged = {**ptrs, "counts_ptr": "*i64", "E": "i32", "P": "i32", "Q": "i32",
              **{k: "constexpr" for k in ("FLATTEN", "NUM_PROGRAMS", "EP", "BP", "BQ", "BK")}}
    shipped = {"a_ptr": "*bf16", "gather_ptr": "*i32", "scatter_ptr": "*i64", "b_ptr": "*bf16", "bias_ptr": "*bf16", "mask_ptr": "*bf16",
               "c_ptr": "*bf16", "counts_ptr": "*i64", "E": "i32", "TOP_K": "i32", "KD": "i32", "N": "i32",
               "stride_be": "i32", "stride_bk": "constexpr", "stride_bn": "i32", "PROGRAMS": "i32", **{k: "constexpr" for k in (
                   "N_TILES", "GATHER", "SCATTER", "HAS_BIAS", "EPILOGUE", "GROUP_M", "EP", "BM", "BN", "BK")}}
    for stages in (3, 4):
        build(tg._grouped_rows_kernel, shipped, {"stride_bk": 1, "N_TILES": 4, "GATHER": False, "SCATTER": False, "HAS_BIAS": False,
                                                 "EPILOGUE": 1, "GROUP_M": 8, "BM": 128, "BN": 256, **tiles}, stages)
    move = {**ptrs, "remove_ptr": "*i64", "add_ptr": "*i64", "gather_ptr": "*i64", "E": "i32", "P": "i32",
            "Q": "i32", "PROGRAMS": "i32", **{k: "constexpr" for k in ("EP", "BP", "BQ", "BK")}}
    build(tg._ragged_k_move_kernel, move, {"BP": 128, "BQ": 256, **tiles}, 4)
    for flatten in (False, True):
        build(persistent._rows_persistent_kernel, rows, {"stride_bk": 1, "N_TILES": 4, "GATHER": False, "RELU": True,
                                                         "FLATTEN": flatten, "GROUP_M": 8,
                                                         "NUM_PROGRAMS": 132, "BM": 128, "BN": 256, **tiles}, 4)
        build(persistent._ragged_persistent_kernel, ragged, {"FLATTEN": flatten, "NUM_PROGRAMS": 132, "BP": 128,
                                                             "BQ": 256, **tiles}, 4)


if __name__ == "__main__":
    {"interpret": interpret, "slotted": slotted, "compile": compile_for_sm90}[sys.argv[1] if len(sys.argv) > 1 else "interpret"]()
