// The gate of few experts: logits_TE = x_TD @ wg_ED^T for E <= kMaxGateExperts, optionally
// fused with the top-k of launch_topk (same scores, selection and outputs).
// Why: with E = 2 the gate is a [T, D] x [D, 2] product, memory-bound on x, which cuBLAS ran as
// a split-K GEMM plus a reduce kernel, ~24 us of the README bf16 layer's 0.46 ms forward on the
// H100 (T 8192, D 2048) for 32 MB of reads (~11 us at the HBM's rate); with the top-k fused,
// nothing reads the logits back and one launch replaces three.
//
// Legend: T tokens, D model dim, E experts, K top-k, TPW tokens per warp.
// Plain CUDA translation unit (no torch headers): `nvcc -arch=sm_90 -c gate_kernels.cu` checks it.
#include "device_utils.cuh"
#include "moe_kernels.h"

#include <algorithm>
#include <cstdint>

namespace adaptmoe {
namespace {

constexpr int kGatePack = 8;            // elements per lane per step: 16 bytes of bf16/fp16
constexpr int kGateTokensPerWarp = 2;   // tokens sharing each load of the gate's weights
constexpr int kGateThreads = 256;

// Lane `lane` owns packs lane, lane + 32, ... of kGatePack elements and sums its products in that
// order, then the warp adds its lanes (xor butterfly: every lane gets the same bits). The scalar
// path (x or wg not aligned to a pack, or D not a multiple of it) visits the same elements in
// the same order, so a token's logits depend neither on alignment nor on the other tokens of its
// warp, and every caller (logits alone or fused with the top-k) gets the same bits.
template <typename TX, int EMAX>
__device__ __forceinline__ void gate_dots(const TX* __restrict__ x, const TX* __restrict__ s_wg, int64_t t0,
                                          int64_t num_tokens, int64_t D, int E, bool vec, int lane,
                                          float (&acc)[kGateTokensPerWarp][EMAX]) {
#pragma unroll
  for (int i = 0; i < kGateTokensPerWarp; ++i) {
#pragma unroll
    for (int e = 0; e < EMAX; ++e) acc[i][e] = 0.f;
  }
  const int64_t packs = (D + kGatePack - 1) / kGatePack;
#pragma unroll 4   // several 16-byte loads of x in flight per lane
  for (int64_t pk = lane; pk < packs; pk += 32) {
    const int64_t d0 = pk * kGatePack;
    float xs[kGateTokensPerWarp][kGatePack];
#pragma unroll
    for (int i = 0; i < kGateTokensPerWarp; ++i) {
      const int64_t t = t0 + i;
      if (t < num_tokens && vec) {
        load_pack<TX, kGatePack>(x + t * D + d0, xs[i]);
      } else {
#pragma unroll
        for (int j = 0; j < kGatePack; ++j) xs[i][j] = (t < num_tokens && d0 + j < D) ? to_f<TX>(x[t * D + d0 + j]) : 0.f;
      }
    }
#pragma unroll
    for (int e = 0; e < EMAX; ++e) {
      if (e < E) {
        float ws[kGatePack];
        if (vec) {
          load_pack<TX, kGatePack>(s_wg + e * D + d0, ws);
        } else {
#pragma unroll
          for (int j = 0; j < kGatePack; ++j) ws[j] = d0 + j < D ? to_f<TX>(s_wg[e * D + d0 + j]) : 0.f;
        }
#pragma unroll
        for (int i = 0; i < kGateTokensPerWarp; ++i) {
#pragma unroll
          for (int j = 0; j < kGatePack; ++j) acc[i][e] = fmaf(xs[i][j], ws[j], acc[i][e]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kGateTokensPerWarp; ++i) {
#pragma unroll
    for (int e = 0; e < EMAX; ++e) acc[i][e] = e < E ? warp_sum(acc[i][e]) : 0.f;
  }
}

// One warp per kGateTokensPerWarp tokens, wg staged in shared memory once per block (read from
// global memory by every warp, its E*D elements per token pair cost more L2 traffic than x itself
// once E*D grew: Mixtral's E 8, D 4096 ran ~0.1 ms slower than cuBLAS that way). TX: x's and wg's
// dtype; TL: the logits' (and the top-k's weights and scores). K == 0: logits only.
template <typename TX, typename TL, int EMAX>
__global__ void gate_kernel(const TX* __restrict__ x, const TX* __restrict__ wg, int64_t num_tokens, int64_t D, int E,
                            bool vec, TL* __restrict__ logits, int K, int fn, bool normalize,
                            int64_t* __restrict__ indices, TL* __restrict__ weights, TL* __restrict__ scores,
                            int64_t* __restrict__ tm_slots) {
  extern __shared__ __align__(32) unsigned char s_raw[];   // 32: a pack of 8 floats
  TX* s_wg = reinterpret_cast<TX*>(s_raw);
  const int64_t n_wg = static_cast<int64_t>(E) * D;
  if (vec) {
    for (int64_t i = threadIdx.x; i < n_wg / kGatePack; i += blockDim.x) {
      reinterpret_cast<Pack<TX, kGatePack>*>(s_wg)[i] = reinterpret_cast<const Pack<TX, kGatePack>*>(wg)[i];
    }
  } else {
    for (int64_t i = threadIdx.x; i < n_wg; i += blockDim.x) s_wg[i] = wg[i];
  }
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  const int64_t step = warps * kGateTokensPerWarp;
  for (int64_t t0 = (blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5)) * kGateTokensPerWarp;
       t0 < num_tokens; t0 += step) {
    float acc[kGateTokensPerWarp][EMAX];
    gate_dots<TX, EMAX>(x, s_wg, t0, num_tokens, D, E, vec, lane, acc);
#pragma unroll
    for (int i = 0; i < kGateTokensPerWarp; ++i) {
      const int64_t t = t0 + i;
      if (t >= num_tokens) break;
      // Lane e holds logit e, rounded to TL as stored (the top-k reads what launch_topk would).
      float mine = 0.f;
#pragma unroll
      for (int e = 0; e < EMAX; ++e) mine = lane == e ? acc[i][e] : mine;
      const TL stored = from_f<TL>(mine);
      if (lane < E) logits[t * E + lane] = stored;
      if (K == 0) continue;
      float v[1] = {lane < E ? logit_value(to_f<TL>(stored)) : -INFINITY};
      float p[1];
      const unsigned padding = lane < E ? 0u : 1u;
      scores_of_logits<1>(v, padding, fn, p);
      topk_of_row<TL, 1>(t, num_tokens, v, p, padding, E, K, normalize, lane, indices, weights, scores, tm_slots);
    }
  }
}

template <typename TX, typename TL, int EMAX>
cudaError_t gate_t(const void* x, const void* wg, int64_t T, int64_t D, int E, void* logits, int K, ScoreFn fn,
                   bool normalize, int64_t* indices, void* weights, void* scores, int64_t* tm_slots,
                   cudaStream_t stream) {
  constexpr uintptr_t kPackBytes = sizeof(TX) * kGatePack;   // load_pack's alignment
  const bool vec = D % kGatePack == 0 && reinterpret_cast<uintptr_t>(x) % kPackBytes == 0 &&
                   reinterpret_cast<uintptr_t>(wg) % kPackBytes == 0;
  constexpr int64_t kTokensPerBlock = kGateThreads / 32 * kGateTokensPerWarp;
  // Each block stages wg once: a bounded grid keeps that traffic small next to x's.
  const int64_t blocks = std::min<int64_t>((T + kTokensPerBlock - 1) / kTokensPerBlock, 1024);
  const size_t smem = static_cast<size_t>(E) * D * sizeof(TX);
  gate_kernel<TX, TL, EMAX><<<static_cast<unsigned>(blocks), kGateThreads, smem, stream>>>(
      static_cast<const TX*>(x), static_cast<const TX*>(wg), T, D, E, vec, static_cast<TL*>(logits), K, fn, normalize,
      indices, static_cast<TL*>(weights), static_cast<TL*>(scores), tm_slots);
  return cudaGetLastError();
}

template <typename TX, typename TL>
cudaError_t gate_e(const void* x, const void* wg, int64_t T, int64_t D, int E, void* logits, int K, ScoreFn fn,
                   bool normalize, int64_t* indices, void* weights, void* scores, int64_t* tm_slots,
                   cudaStream_t stream) {
  if (E <= 2) return gate_t<TX, TL, 2>(x, wg, T, D, E, logits, K, fn, normalize, indices, weights, scores, tm_slots, stream);
  if (E <= 4) return gate_t<TX, TL, 4>(x, wg, T, D, E, logits, K, fn, normalize, indices, weights, scores, tm_slots, stream);
  return gate_t<TX, TL, 8>(x, wg, T, D, E, logits, K, fn, normalize, indices, weights, scores, tm_slots, stream);
}

}  // namespace

bool gate_kernel_serves(DType x_dt, DType wg_dt, int64_t E, int64_t D) {
  const int64_t bytes = E * D * (x_dt == kFloat32 ? 4 : 2);
  return E >= 1 && E <= kMaxGateExperts && D >= 1 && x_dt == wg_dt && bytes <= kMaxGateWeightBytes;
}

cudaError_t launch_gate(const void* x_TD, const void* wg_ED, DType dt, bool logits_fp32, int64_t T, int64_t D, int E,
                        void* logits_TE, int K, ScoreFn fn, bool normalize, int64_t* indices_TK, void* weights_TK,
                        void* scores_TE, int64_t* tm_slots_TK, cudaStream_t stream) {
  if (!gate_kernel_serves(dt, dt, E, D) || K < 0 || K > E) return cudaErrorInvalidValue;
  if (T == 0) return cudaSuccess;
  if (logits_fp32) {
    switch (dt) {
      case kFloat16: return gate_e<__half, float>(x_TD, wg_ED, T, D, E, logits_TE, K, fn, normalize, indices_TK, weights_TK, scores_TE, tm_slots_TK, stream);
      case kBFloat16: return gate_e<__nv_bfloat16, float>(x_TD, wg_ED, T, D, E, logits_TE, K, fn, normalize, indices_TK, weights_TK, scores_TE, tm_slots_TK, stream);
      default: return gate_e<float, float>(x_TD, wg_ED, T, D, E, logits_TE, K, fn, normalize, indices_TK, weights_TK, scores_TE, tm_slots_TK, stream);
    }
  }
  switch (dt) {
    case kFloat16: return gate_e<__half, __half>(x_TD, wg_ED, T, D, E, logits_TE, K, fn, normalize, indices_TK, weights_TK, scores_TE, tm_slots_TK, stream);
    case kBFloat16: return gate_e<__nv_bfloat16, __nv_bfloat16>(x_TD, wg_ED, T, D, E, logits_TE, K, fn, normalize, indices_TK, weights_TK, scores_TE, tm_slots_TK, stream);
    default: return gate_e<float, float>(x_TD, wg_ED, T, D, E, logits_TE, K, fn, normalize, indices_TK, weights_TK, scores_TE, tm_slots_TK, stream);
  }
}

}  // namespace adaptmoe
