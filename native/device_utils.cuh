// Device helpers shared by the native translation units: dtype conversion, 16-byte packs,
// warp reductions. Header-only, internal linkage (each .cu gets its own copy).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "moe_kernels.h"

namespace adaptmoe {
namespace {

constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// dtype helpers
template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Small per-(t, k) values (weights, dot products) whose dtype may differ from the rows'.
__device__ __forceinline__ float load_any(const void* p, int dt, int64_t i) {
  switch (dt) {
    case kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}
__device__ __forceinline__ void store_any(void* p, int dt, int64_t i, float v) {
  switch (dt) {
    case kFloat16: static_cast<__half*>(p)[i] = __float2half_rn(v); break;
    case kBFloat16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(p)[i] = v;
  }
}

// N consecutive elements moved as one access (16 bytes when N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_pack(const T* p, float (&f)[N]) {
  const Pack<T, N> pk = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) f[i] = to_f<T>(pk.v[i]);
}
template <typename T, int N>
__device__ __forceinline__ void store_pack(T* p, const float (&f)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_f<T>(f[i]);
  *reinterpret_cast<Pack<T, N>*>(p) = pk;
}

// The same with a streaming (evict-first) store: rows written once and read by a later kernel
// should not push the rows still being read out of L2.
template <typename T, int N>
__device__ __forceinline__ void store_pack_stream(T* p, const float (&f)[N]) {
  Pack<T, N> pk;
#pragma unroll
  for (int i = 0; i < N; ++i) pk.v[i] = from_f<T>(f[i]);
  if constexpr (sizeof(Pack<T, N>) == 16) {
    __stcs(reinterpret_cast<uint4*>(p), *reinterpret_cast<const uint4*>(&pk));
  } else {
    *reinterpret_cast<Pack<T, N>*>(p) = pk;
  }
}

// Unsigned key with the order of the floats (-0 == +0; NaN ranks as -inf); 0 is below every
// key (taken or padding slots).
__device__ __forceinline__ unsigned ordered_key(float x) {
  if (isnan(x)) x = -INFINITY;
  unsigned b = __float_as_uint(x);
  if ((b << 1) == 0u) b = 0u;   // -0 -> +0: equal floats, equal keys
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ unsigned warp_max_u32(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFull, v);
#else
  for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(kFull, v, o));
  return v;
#endif
}

__device__ __forceinline__ int warp_min_i32(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_min_sync(kFull, v);
#else
  for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(kFull, v, o));
  return v;
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// The Activation codes of moe_kernels.h, in fp32.
__device__ __forceinline__ float activate(float v, int act) {
  switch (act) {
    case kActRelu: return fmaxf(v, 0.f);
    case kActGelu: return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    case kActGeluTanh: return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    case kActSilu: return v / (1.f + __expf(-v));
    case kActTanh: return tanhf(v);
    case kActSigmoid: return 1.f / (1.f + __expf(-v));
    default: return v;
  }
}

// Blocks of `kernel` (launched with `threads` threads) resident at once on the current device:
// one full wave.
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads) {
  int device = 0, sms = 1, per_sm = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, 0);
  return max(1, sms * max(1, per_sm));
}

// ---------------------------------------------------------------------------------------------
// Gating: one token's scores with one warp, the lane holding experts lane, lane + 32, ... (VPL of
// them). v: the logits in fp32 (a NaN logit reads -inf: never preferred, score 0 under softmax;
// padding past E reads -inf); p: softmax (max-subtracted) or sigmoid of v. `padding` bit j:
// element j is past E.
template <int VPL>
__device__ __forceinline__ void scores_of_logits(const float (&v)[VPL], unsigned padding, int fn, float (&p)[VPL]) {
  if (fn == kSoftmax) {
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < VPL; ++j) m = fmaxf(m, v[j]);
    m = warp_max(m);
    if (m == -INFINITY) m = 0.f;
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      p[j] = (padding >> j & 1u) ? 0.f : expf(v[j] - m);
      s += p[j];
    }
    const float inv = 1.f / warp_sum(s);
#pragma unroll
    for (int j = 0; j < VPL; ++j) p[j] *= inv;
  } else {
#pragma unroll
    for (int j = 0; j < VPL; ++j) p[j] = 1.f / (1.f + expf(-v[j]));
  }
}

// A logit as the gating kernels read it: NaN ranks as -inf.
__device__ __forceinline__ float logit_value(float x) { return isnan(x) ? -INFINITY : x; }

// v and p (above) of the logits row `row`; returns the padding mask.
template <typename T, int VPL>
__device__ __forceinline__ unsigned row_scores(const T* __restrict__ row, int E, int lane, int fn, float (&v)[VPL],
                                               float (&p)[VPL]) {
  unsigned padding = 0u;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int e = j * 32 + lane;
    if (e < E) {
      v[j] = logit_value(to_f<T>(row[e]));
    } else {
      v[j] = -INFINITY;
      padding |= 1u << j;
    }
  }
  scores_of_logits<VPL>(v, padding, fn, p);
  return padding;
}

// Top-k of token t from its logits v and scores p (row_scores' layout): writes indices[t, r] and
// weights[t, r] (descending score; renormalised to sum 1 when `normalize`), scores[t, :] when
// given, and tm_slots[t, r] = e * T + t (token-major rows of a dense [E, T] layout) when given.
// Selection on order-preserving unsigned keys of the logits (ties: lower expert first): two warp
// reductions per round (REDUX on sm_80+) instead of ten shuffles, which made the top-k ~12 us of
// the fine-grained forward on the H100 (8192 tokens, 64 experts, top-8).
template <typename T, int VPL>
__device__ __forceinline__ void topk_of_row(int64_t t, int64_t num_tokens, const float (&v)[VPL],
                                            const float (&p)[VPL], unsigned padding, int E, int K, bool normalize,
                                            int lane, int64_t* __restrict__ indices, T* __restrict__ weights,
                                            T* __restrict__ scores, int64_t* __restrict__ tm_slots) {
  if (scores != nullptr) {
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const int e = j * 32 + lane;
      if (e < E) scores[t * E + e] = from_f<T>(p[j]);
    }
  }
  unsigned key[VPL];
  int rank[VPL];
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    key[j] = (padding >> j & 1u) ? 0u : ordered_key(v[j]);
    rank[j] = 0;
  }
  unsigned chosen = 0u;  // bit j: element j is in the top-k
  float picked = 0.f;
  for (int r = 0; r < K; ++r) {
    unsigned lk = 0u;
    int li = INT_MAX;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      if (key[j] > lk) {   // j ascending: the first of equal keys (the lower expert) stays
        lk = key[j];
        li = j * 32 + lane;
      }
    }
    const unsigned best = warp_max_u32(lk);
    const int bi = warp_min_i32(lk == best ? li : INT_MAX);
    if ((bi & 31) == lane) {
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        if (j == (bi >> 5)) {
          key[j] = 0u;
          chosen |= 1u << j;
          rank[j] = r;
          picked += p[j];
        }
      }
    }
  }
  float scale = 1.f;
  if (normalize) {
    const float total = warp_sum(picked);
    scale = total > 0.f ? 1.f / total : 0.f;
  }
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    if (chosen >> j & 1u) {
      const int e = j * 32 + lane;
      indices[t * K + rank[j]] = e;
      weights[t * K + rank[j]] = from_f<T>(p[j] * scale);
      if (tm_slots != nullptr) tm_slots[t * K + rank[j]] = e * num_tokens + t;
    }
  }
}

}  // namespace
}  // namespace adaptmoe
