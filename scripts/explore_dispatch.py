"""Dispatch (row scatter) kernel variants, bf16, capacity mode, timed on the GPU against the
shipped row-major kernel's design (numbers for native/NOTES.md; not a product path).

  rows      : one block per output row r in order, source token through inv[r] (shipped design)
  rows_hint : the same, loads with an L2 evict_last policy, stores streaming (st.global.cs)
  interleave: output rows visited round-robin over experts, G rows of one expert at a time, so
              the blocks in flight read a narrow token range (each token's K reads close in time)
  inter_hint: interleave + the cache hints
  tokens    : one block per token, its row loaded once and stored K times (cs stores); rows no
              token feeds are not zeroed here (the shipped kernel does), so this is a lower bound

    python scripts/explore_dispatch.py
"""
from __future__ import annotations

import torch
from torch.utils.cpp_extension import load_inline

from adaptmoe.examples.timing import median_ms

CUDA_SRC = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cstdint>

__device__ __forceinline__ uint4 load_keep(const uint4* p) {
  uint4 r;
  asm volatile("{\n .reg .b64 pol;\n createpolicy.fractional.L2::evict_last.b64 pol, 1.0;\n"
               " ld.global.nc.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], pol;\n}\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

template <bool HINT>
__device__ __forceinline__ void copy_row(const uint4* src, uint4* dst, int nv) {
  for (int v = threadIdx.x; v < nv; v += blockDim.x) {
    if (HINT) __stcs(dst + v, load_keep(src + v));
    else dst[v] = src[v];
  }
}

__device__ __forceinline__ void zero_row(uint4* dst, int nv, bool hint) {
  const uint4 z = make_uint4(0, 0, 0, 0);
  for (int v = threadIdx.x; v < nv; v += blockDim.x) {
    if (hint) __stcs(dst + v, z); else dst[v] = z;
  }
}

template <bool HINT, bool INTERLEAVE>
__global__ void scatter_rows(const uint4* __restrict__ x, const int* __restrict__ inv, int K, int nv,
                             int E, int C, int G, uint4* __restrict__ out) {
  int64_t r = blockIdx.x;
  if (INTERLEAVE) {
    const int64_t per_round = static_cast<int64_t>(E) * G;
    const int64_t round = r / per_round, w = r % per_round;
    r = (w / G) * C + round * G + (w % G);
  }
  const int i = inv[r];
  if (i < 0) { zero_row(out + r * nv, nv, HINT); return; }
  copy_row<HINT>(x + static_cast<int64_t>(i / K) * nv, out + r * nv, nv);
}

__global__ void scatter_tokens(const uint4* __restrict__ x, const int64_t* __restrict__ slots, int K, int nv,
                               uint4* __restrict__ out) {
  const int64_t t = blockIdx.x;
  for (int v = threadIdx.x; v < nv; v += blockDim.x) {
    const uint4 val = x[t * nv + v];
    for (int k = 0; k < K; ++k) {
      const int64_t s = slots[t * K + k];
      if (s >= 0) __stcs(out + s * nv + v, val);
    }
  }
}

void run(torch::Tensor x, torch::Tensor inv, torch::Tensor slots, torch::Tensor out, int64_t variant,
         int64_t E, int64_t C, int64_t G) {
  const int K = static_cast<int>(slots.size(1));
  const int nv = static_cast<int>(x.size(1) * x.element_size() / 16);
  const int threads = nv < 1024 ? nv : 1024;
  const unsigned R = static_cast<unsigned>(out.size(0));
  auto stream = at::cuda::getCurrentCUDAStream();
  auto xs = reinterpret_cast<const uint4*>(x.data_ptr());
  auto os = reinterpret_cast<uint4*>(out.data_ptr());
  auto iv = inv.data_ptr<int>();
  switch (variant) {
    case 0: scatter_rows<false, false><<<R, threads, 0, stream>>>(xs, iv, K, nv, E, C, G, os); break;
    case 1: scatter_rows<true, false><<<R, threads, 0, stream>>>(xs, iv, K, nv, E, C, G, os); break;
    case 2: scatter_rows<false, true><<<R, threads, 0, stream>>>(xs, iv, K, nv, E, C, G, os); break;
    case 3: scatter_rows<true, true><<<R, threads, 0, stream>>>(xs, iv, K, nv, E, C, G, os); break;
    default: scatter_tokens<<<static_cast<unsigned>(x.size(0)), threads, 0, stream>>>(
        xs, slots.data_ptr<int64_t>(), K, nv, os);
  }
}
"""
CPP_SRC = ("void run(torch::Tensor x, torch::Tensor inv, torch::Tensor slots, torch::Tensor out, int64_t variant,"
           " int64_t E, int64_t C, int64_t G);")
VARIANTS = ["rows", "rows_hint", "interleave", "inter_hint", "tokens"]
SHAPES = {"fine64": (8192, 2048, 64, 8), "dsv3": (16384, 7168, 256, 8), "mixtral": (8192, 4096, 8, 2),
          "readme": (8192, 2048, 2, 2)}


def capacity_slots(T: int, E: int, K: int, device: str) -> tuple[torch.Tensor, int]:
    """cf=1 slots (token-order priority, first choices first) for random softmax-top-k routing."""
    from adaptmoe.routing import assign_locations
    C = K * ((T + E - 1) // E)
    idx_TK = torch.randn(T, E, device=device).topk(K, dim=1).indices
    loc_TK, _, _ = assign_locations(idx_TK, E)
    slots_TK = torch.where(loc_TK < C, idx_TK * C + loc_TK, torch.full_like(idx_TK, -1))
    return slots_TK, C


def main() -> None:
    mod = load_inline("explore_dispatch", CPP_SRC, cuda_sources=CUDA_SRC, functions=["run"],
                      extra_cuda_cflags=["-O3", "-arch=sm_90"])
    print(torch.cuda.get_device_name(), torch.__version__)
    for name, (T, D, E, K) in SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        slots, C = capacity_slots(T, E, K, "cuda")
        R = E * C
        inv = torch.full((R,), -1, device="cuda", dtype=torch.int32)
        kept = slots.reshape(-1) >= 0
        inv[slots.reshape(-1)[kept]] = torch.arange(T * K, device="cuda", dtype=torch.int32)[kept]
        moved = (int(kept.sum()) + T) * D * 2   # each token read once + each kept row written once
        written = R * D * 2
        ref = torch.empty(R, D, device="cuda", dtype=torch.bfloat16)
        mod.run(x, inv, slots, ref, 0, E, C, 8)
        for v, label in enumerate(VARIANTS):
            for G in ((8, 32) if "inter" in label else (8,)):
                out = torch.full((R, D), float("nan"), device="cuda", dtype=torch.bfloat16)
                if label == "tokens":
                    out.zero_()
                mod.run(x, inv, slots, out, v, E, C, G)
                same = torch.equal(out, ref)
                ms = median_ms(lambda: mod.run(x, inv, slots, out, v, E, C, G), "cuda", iters=50, warmup=5)
                tag = f"{label}(G={G})" if "inter" in label else label
                print(f"{name:<8} {tag:<16} {ms * 1e3:8.1f} us  {moved / ms / 1e9:6.2f} TB/s (min bytes)  "
                      f"{written / ms / 1e9:6.2f} TB/s (writes)  same as rows: {same}")


if __name__ == "__main__":
    main()
