// adaptmoe native kernels: fused gating + top-k, slot assignment, dispatch/combine row movers.
// Plain CUDA translation unit (no torch headers): `nvcc -arch=sm_90 -c moe_kernels.cu` checks it.
//
// Legend: T tokens, E experts, K top-k, D model dim, R rows of the expert-major buffer,
// NC chunks of kLocateChunk tokens. All arithmetic accumulates in fp32; tensors keep their dtype.
#include "moe_kernels.h"
#include "device_utils.cuh"

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace adaptmoe {
namespace {

// ---------------------------------------------------------------------------------------------
// Gating: one warp per token, lane holds experts lane, lane+32, ... (VPL of them).
template <typename T, int VPL>
__global__ void topk_kernel(const T* __restrict__ logits, int64_t num_tokens, int E, int K, int fn,
                            bool normalize, int64_t* __restrict__ indices, T* __restrict__ weights,
                            T* __restrict__ scores) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_block = blockDim.x >> 5;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t t = blockIdx.x * warps_per_block + (threadIdx.x >> 5); t < num_tokens; t += stride) {
    const T* row = logits + t * E;
    float v[VPL];
    float p[VPL];
    int rank[VPL];
    unsigned taken = 0u;   // bit j: element j is padding or already chosen
    unsigned chosen = 0u;  // bit j: element j is in the top-k
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const int e = j * 32 + lane;
      rank[j] = 0;
      if (e < E) {
        const float x = to_f<T>(row[e]);
        v[j] = isnan(x) ? -INFINITY : x;  // a NaN logit is never preferred (and never OOB)
      } else {
        v[j] = -INFINITY;
        taken |= 1u << j;
      }
    }
    if (fn == kSoftmax) {
      float m = -INFINITY;
#pragma unroll
      for (int j = 0; j < VPL; ++j) m = fmaxf(m, v[j]);
      m = warp_max(m);
      if (m == -INFINITY) m = 0.f;
      float s = 0.f;
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        p[j] = (taken >> j & 1u) ? 0.f : expf(v[j] - m);
        s += p[j];
      }
      const float inv = 1.f / warp_sum(s);
#pragma unroll
      for (int j = 0; j < VPL; ++j) p[j] *= inv;
    } else {
#pragma unroll
      for (int j = 0; j < VPL; ++j) p[j] = 1.f / (1.f + expf(-v[j]));
    }
    if (scores != nullptr) {
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const int e = j * 32 + lane;
        if (e < E) scores[t * E + e] = from_f<T>(p[j]);
      }
    }
    float picked = 0.f;
    for (int r = 0; r < K; ++r) {
      float bv = -INFINITY;
      int bi = INT_MAX;
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const int e = j * 32 + lane;
        if (!(taken >> j & 1u) && (v[j] > bv || (v[j] == bv && e < bi))) {
          bv = v[j];
          bi = e;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(kFull, bv, o);
        const int oi = __shfl_xor_sync(kFull, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
          bv = ov;
          bi = oi;
        }
      }
      if ((bi & 31) == lane) {
#pragma unroll
        for (int j = 0; j < VPL; ++j) {
          if (j == (bi >> 5)) {
            taken |= 1u << j;
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
        indices[t * K + rank[j]] = j * 32 + lane;
        weights[t * K + rank[j]] = from_f<T>(p[j] * scale);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Slot assignment, pass 1: per (expert, choice, chunk) counts, layout hist[e][k][c].
__global__ void hist_kernel(const int64_t* __restrict__ idx, int64_t num_tokens, int E, int K,
                            int64_t NC, int* __restrict__ hist) {
  extern __shared__ int s_hist[];  // E
  const int64_t c = blockIdx.x;
  const int64_t t = c * kLocateChunk + threadIdx.x;
  for (int k = 0; k < K; ++k) {
    for (int e = threadIdx.x; e < E; e += blockDim.x) s_hist[e] = 0;
    __syncthreads();
    if (t < num_tokens) {
      const int64_t e = idx[t * K + k];
      if (e >= 0 && e < E) atomicAdd(&s_hist[e], 1);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) hist[(static_cast<int64_t>(e) * K + k) * NC + c] = s_hist[e];
    __syncthreads();
  }
}

// Pass 2: one block per expert, exclusive scan over (k, c) in place; counts_E = the total.
template <int BT>
__global__ void scan_hist_kernel(int* __restrict__ hist, int64_t L, int64_t* __restrict__ counts) {
  using Scan = cub::BlockScan<int, BT>;
  __shared__ typename Scan::TempStorage tmp;
  int* h = hist + static_cast<int64_t>(blockIdx.x) * L;
  int carry = 0;
  for (int64_t base = 0; base < L; base += BT) {
    const int64_t i = base + threadIdx.x;
    const int x = i < L ? h[i] : 0;
    int excl, agg;
    Scan(tmp).ExclusiveSum(x, excl, agg);
    if (i < L) h[i] = carry + excl;
    carry += agg;
    __syncthreads();
  }
  if (threadIdx.x == 0) counts[blockIdx.x] = carry;
}

// Pass 3: one block per chunk, one thread per token; rank inside the chunk by warp matching.
__global__ void locate_kernel(const int64_t* __restrict__ idx, int64_t num_tokens, int E, int K,
                              int64_t NC, const int* __restrict__ base,
                              const int64_t* __restrict__ counts, int64_t capacity,
                              int64_t* __restrict__ locations, int64_t* __restrict__ slots) {
  constexpr int kWarps = kLocateChunk / 32;
  extern __shared__ unsigned char smem_raw[];
  long long* s_off = reinterpret_cast<long long*>(smem_raw);          // E (dropless only)
  int* s_cnt = reinterpret_cast<int*>(s_off + (capacity < 0 ? E : 0));  // kWarps x E
  if (capacity < 0) {
    using Scan = cub::BlockScan<long long, kLocateChunk>;
    __shared__ typename Scan::TempStorage tmp;
    long long carry = 0;
    for (int b = 0; b < E; b += kLocateChunk) {
      const int e = b + threadIdx.x;
      const long long x = e < E ? static_cast<long long>(counts[e]) : 0;
      long long excl, agg;
      Scan(tmp).ExclusiveSum(x, excl, agg);
      if (e < E) s_off[e] = carry + excl;
      carry += agg;
      __syncthreads();
    }
  }
  for (int i = threadIdx.x; i < kWarps * E; i += blockDim.x) s_cnt[i] = 0;
  __syncthreads();
  const int64_t c = blockIdx.x;
  const int64_t t = c * kLocateChunk + threadIdx.x;
  const int w = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const unsigned lower = (1u << lane) - 1u;
  for (int k = 0; k < K; ++k) {
    int e = -1;
    if (t < num_tokens) {
      const int64_t x = idx[t * K + k];
      e = (x >= 0 && x < E) ? static_cast<int>(x) : -2;  // -2: invalid expert, dropped
    }
    const unsigned peers = __match_any_sync(kFull, e);
    const int lrank = __popc(peers & lower);
    const bool valid = e >= 0;
    if (valid && lrank == 0) s_cnt[w * E + e] = __popc(peers);
    __syncthreads();
    if (valid) {
      int pre = 0;
      for (int w2 = 0; w2 < w; ++w2) pre += s_cnt[w2 * E + e];
      const int64_t loc = base[(static_cast<int64_t>(e) * K + k) * NC + c] + pre + lrank;
      int64_t slot;
      if (capacity >= 0) slot = loc < capacity ? static_cast<int64_t>(e) * capacity + loc : -1;
      else slot = s_off[e] + loc;
      locations[t * K + k] = loc;
      slots[t * K + k] = slot;
    } else if (e == -2) {
      locations[t * K + k] = -1;
      slots[t * K + k] = -1;
    }
    __syncthreads();
    if (valid && lrank == 0) s_cnt[w * E + e] = 0;
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------------
// Row movers.
// Token-major scatter: one block per token; its row is read from memory once (the K stores of
// the plain kernel reuse the registers) and each kept choice's row is written with streaming
// stores. H100 (scripts/explore_dispatch.py): fine64 117 us vs 175 us for one block per output
// row reading its token through an inverse map (K reads per token), DeepSeek-V3 763 vs 1388 us.
// Rows no choice feeds are zeroed by zero_unfed_rows_kernel through the inverse map.
__global__ void inverse_slots_kernel(const int64_t* __restrict__ slots, int64_t n, int64_t R,
                                     int* __restrict__ inv) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    const int64_t s = slots[i];
    if (s >= 0 && s < R) inv[s] = static_cast<int>(i);
  }
}

// Token t's K choices into shared memory for the whole block: slot (-1 when dropped or outside
// [0, R)) and weight (1 without weights). Ends with a barrier.
__device__ __forceinline__ void stage_choices(const int64_t* __restrict__ slots, const void* __restrict__ w,
                                              int w_dt, int64_t t, int K, int64_t R, int64_t* s_slot, float* s_w) {
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t s = slots[t * K + k];
    s_slot[k] = (s >= 0 && s < R) ? s : -1;
    s_w[k] = w != nullptr ? load_any(w, w_dt, t * K + k) : 1.f;
  }
  __syncthreads();
}

// One warp per row (grid-stride): rows with inv < 0 become 0.
template <typename T, int N>
__global__ void zero_unfed_rows_kernel(const int* __restrict__ inv, int64_t R, int64_t D, T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  float z[N];
#pragma unroll
  for (int j = 0; j < N; ++j) z[j] = 0.f;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < R; r += warps) {
    if (inv[r] >= 0) continue;
    for (int64_t v = lane; v < D / N; v += 32) store_pack_stream<T, N>(out + r * D + v * N, z);
  }
}

template <typename T, int N>
__global__ void scatter_by_tokens_kernel(const T* __restrict__ src, const int64_t* __restrict__ slots,
                                         const void* __restrict__ w, int w_dt, int K, int64_t D, int64_t R,
                                         T* __restrict__ out) {
  extern __shared__ unsigned char smem_raw[];
  int64_t* s_slot = reinterpret_cast<int64_t*>(smem_raw);
  float* s_w = reinterpret_cast<float*>(s_slot + K);
  const int64_t t = blockIdx.x;
  stage_choices(slots, w, w_dt, t, K, R, s_slot, s_w);
  const T* srow = src + t * D;
  for (int64_t v = threadIdx.x; v < D / N; v += blockDim.x) {
    float f[N], g[N];
    load_pack<T, N>(srow + v * N, f);
    for (int k = 0; k < K; ++k) {
      const int64_t s = s_slot[k];
      if (s < 0) continue;
#pragma unroll
      for (int j = 0; j < N; ++j) g[j] = f[j] * s_w[k];
      store_pack_stream<T, N>(out + s * D + v * N, g);
    }
  }
}

// The combine's backward: out rows as above, plus dot_out[t,k] = <src[t], dot_src[slots[t,k]]>
// (0 for dropped choices). Choices outer: one block reduction per kept choice; the token row is
// re-read from L1.
template <typename T, int N>
__global__ void scatter_dot_by_tokens_kernel(const T* __restrict__ src, const int64_t* __restrict__ slots,
                                             const void* __restrict__ w, int w_dt, const T* __restrict__ dot_src,
                                             int K, int64_t D, int64_t R, T* __restrict__ out,
                                             void* __restrict__ dot_out, int dot_dt) {
  __shared__ float s_part[32];
  const int64_t t = blockIdx.x;
  const T* srow = src + t * D;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int k = 0; k < K; ++k) {
    const int64_t i = t * K + k;
    const int64_t s = slots[i];
    if (s < 0 || s >= R) {   // the same for the whole block: no divergent barrier
      if (threadIdx.x == 0) store_any(dot_out, dot_dt, i, 0.f);
      continue;
    }
    const float wk = w != nullptr ? load_any(w, w_dt, i) : 1.f;
    float acc = 0.f;
    for (int64_t v = threadIdx.x; v < D / N; v += blockDim.x) {
      float f[N], d[N];
      load_pack<T, N>(srow + v * N, f);
      load_pack<T, N>(dot_src + s * D + v * N, d);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        acc = fmaf(f[j], d[j], acc);
        f[j] *= wk;
      }
      store_pack_stream<T, N>(out + s * D + v * N, f);
    }
    acc = warp_sum(acc);
    if (lane == 0) s_part[warp] = acc;
    __syncthreads();
    if (warp == 0) {
      acc = lane < static_cast<int>(blockDim.x >> 5) ? s_part[lane] : 0.f;
      acc = warp_sum(acc);
      if (lane == 0) store_any(dot_out, dot_dt, i, acc);
    }
    __syncthreads();   // s_part is reused by the next choice
  }
}

template <typename T, int N>
__global__ void gather_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ slots,
                                   const void* __restrict__ w, int w_dt, const T* __restrict__ dot_src,
                                   int64_t num_tokens, int K, int64_t D, int64_t R,
                                   T* __restrict__ out, void* __restrict__ dot_out, int dot_dt) {
  extern __shared__ unsigned char smem_raw[];
  int64_t* s_slot = reinterpret_cast<int64_t*>(smem_raw);
  float* s_w = reinterpret_cast<float*>(s_slot + K);
  const int64_t nv = D / N;
  const int64_t b = blockIdx.x;
  stage_choices(slots, w, w_dt, b, K, R, s_slot, s_w);
  for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
    float acc[N];
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] = 0.f;
#pragma unroll 4
    for (int k = 0; k < K; ++k) {
      const int64_t s = s_slot[k];
      if (s < 0) continue;
      const float wk = s_w[k];
      float f[N];
      load_pack<T, N>(src + s * D + v * N, f);
#pragma unroll
      for (int i = 0; i < N; ++i) acc[i] = fmaf(f[i], wk, acc[i]);
    }
    store_pack<T, N>(out + b * D + v * N, acc);
  }
  if (dot_out != nullptr) {  // warp per choice: <dot_src[t], src[slot]>
    const int lane = threadIdx.x & 31;
    const T* row = dot_src + b * D;
    for (int k = threadIdx.x >> 5; k < K; k += blockDim.x >> 5) {
      const int64_t s = s_slot[k];
      float acc = 0.f;
      if (s >= 0) {
        for (int64_t v = lane; v < nv; v += 32) {
          float a[N], d[N];
          load_pack<T, N>(row + v * N, a);
          load_pack<T, N>(src + s * D + v * N, d);
#pragma unroll
          for (int i = 0; i < N; ++i) acc = fmaf(a[i], d[i], acc);
        }
      }
      acc = warp_sum(acc);
      if (lane == 0) store_any(dot_out, dot_dt, b * K + k, acc);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host helpers
inline bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

inline int row_threads(int64_t packs) {
  int64_t t = (packs + 31) / 32 * 32;
  if (t < 32) t = 32;
  if (t > 256) t = 256;
  return static_cast<int>(t);
}

template <typename T, int VPL>
cudaError_t topk_t(const void* logits, int64_t T_, int E, int K, ScoreFn fn, bool normalize,
                   int64_t* indices, void* weights, void* scores, cudaStream_t stream) {
  constexpr int kThreads = 256;
  int64_t blocks = (T_ + kThreads / 32 - 1) / (kThreads / 32);
  if (blocks > 8192) blocks = 8192;
  topk_kernel<T, VPL><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), T_, E, K, fn, normalize, indices, static_cast<T*>(weights),
      static_cast<T*>(scores));
  return cudaGetLastError();
}

template <typename T>
cudaError_t topk_dispatch_vpl(const void* logits, int64_t T_, int E, int K, ScoreFn fn, bool normalize,
                              int64_t* indices, void* weights, void* scores, cudaStream_t stream) {
  if (E <= 32) return topk_t<T, 1>(logits, T_, E, K, fn, normalize, indices, weights, scores, stream);
  if (E <= 64) return topk_t<T, 2>(logits, T_, E, K, fn, normalize, indices, weights, scores, stream);
  if (E <= 128) return topk_t<T, 4>(logits, T_, E, K, fn, normalize, indices, weights, scores, stream);
  if (E <= 256) return topk_t<T, 8>(logits, T_, E, K, fn, normalize, indices, weights, scores, stream);
  if (E <= 512) return topk_t<T, 16>(logits, T_, E, K, fn, normalize, indices, weights, scores, stream);
  return topk_t<T, 32>(logits, T_, E, K, fn, normalize, indices, weights, scores, stream);
}

// Threads of a token-major block: one 16-byte pack each up to 1024 (fewer packs in flight per
// block cost bandwidth: DeepSeek-V3's 896-pack rows ran slower at 256 threads).
inline int token_threads(int64_t packs) {
  int64_t t = (packs + 31) / 32 * 32;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(t, 32), 1024));
}

template <typename T, int N>
cudaError_t scatter_n(const T* src, const int64_t* slots, const void* w, DType w_dt, const T* dot_src,
                      int64_t T_, int K, int64_t D, int64_t R, int* inv, T* out, void* dot_out, DType dot_dt,
                      cudaStream_t stream) {
  const int threads = token_threads(D / N);
  if (T_ > 0) {
    if (dot_out != nullptr) {
      scatter_dot_by_tokens_kernel<T, N><<<static_cast<unsigned>(T_), threads, 0, stream>>>(
          src, slots, w, w_dt, dot_src, K, D, R, out, dot_out, dot_dt);
    } else {
      const size_t smem = static_cast<size_t>(K) * (sizeof(int64_t) + sizeof(float));
      scatter_by_tokens_kernel<T, N><<<static_cast<unsigned>(T_), threads, smem, stream>>>(
          src, slots, w, w_dt, K, D, R, out);
    }
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const int64_t zero_blocks = std::min<int64_t>((R + 7) / 8, 132 * 16);
  zero_unfed_rows_kernel<T, N><<<static_cast<unsigned>(zero_blocks), 256, 0, stream>>>(inv, R, D, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t scatter_t(const void* src, const int64_t* slots, const void* w, DType w_dt, const void* dot_src,
                      int64_t T_, int K, int64_t D, int64_t R, int* workspace, void* out, void* dot_out,
                      DType dot_dt, cudaStream_t stream) {
  constexpr int NV = 16 / static_cast<int>(sizeof(T));
  const bool vec = D % NV == 0 && aligned16(src) && aligned16(out) && aligned16(dot_src);
  const int64_t n = T_ * K;
  cudaError_t err;
  if (dot_out != nullptr && n > 0 && (R == 0 || D == 0)) {   // no kernel runs: dots of nothing are 0
    return cudaMemsetAsync(dot_out, 0, static_cast<size_t>(n) * (dot_dt == kFloat32 ? 4 : 2), stream);
  }
  if (R == 0 || D == 0) return cudaSuccess;
  err = cudaMemsetAsync(workspace, 0xFF, static_cast<size_t>(R) * sizeof(int), stream);
  if (err != cudaSuccess) return err;
  if (n > 0) {
    inverse_slots_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(slots, n, R, workspace);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  const T* s = static_cast<const T*>(src);
  const T* d = static_cast<const T*>(dot_src);
  T* o = static_cast<T*>(out);
  if (vec) return scatter_n<T, NV>(s, slots, w, w_dt, d, T_, K, D, R, workspace, o, dot_out, dot_dt, stream);
  return scatter_n<T, 1>(s, slots, w, w_dt, d, T_, K, D, R, workspace, o, dot_out, dot_dt, stream);
}

template <typename T>
cudaError_t gather_t(const void* src, const int64_t* slots, const void* w, DType w_dt, const void* dot_src,
                     int64_t T_, int K, int64_t D, int64_t R, void* out, void* dot_out, DType dot_dt,
                     cudaStream_t stream) {
  if (T_ == 0 || D == 0) return cudaSuccess;
  const size_t smem = static_cast<size_t>(K) * (sizeof(int64_t) + sizeof(float));
  constexpr int NV = 16 / static_cast<int>(sizeof(T));
  const bool vec = D % NV == 0 && aligned16(src) && aligned16(out) && aligned16(dot_src);
  if (vec) {
    gather_rows_kernel<T, NV><<<static_cast<unsigned>(T_), row_threads(D / NV), smem, stream>>>(
        static_cast<const T*>(src), slots, w, w_dt, static_cast<const T*>(dot_src), T_, K, D, R,
        static_cast<T*>(out), dot_out, dot_dt);
  } else {
    gather_rows_kernel<T, 1><<<static_cast<unsigned>(T_), row_threads(D), smem, stream>>>(
        static_cast<const T*>(src), slots, w, w_dt, static_cast<const T*>(dot_src), T_, K, D, R,
        static_cast<T*>(out), dot_out, dot_dt);
  }
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
cudaError_t launch_topk(const void* logits_TE, DType dt, int64_t T, int E, int K, ScoreFn fn,
                        bool normalize, int64_t* indices_TK, void* weights_TK, void* scores_TE,
                        cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (E < 1 || E > kMaxTopkExperts || K < 1 || K > E) return cudaErrorInvalidValue;
  switch (dt) {
    case kFloat16: return topk_dispatch_vpl<__half>(logits_TE, T, E, K, fn, normalize, indices_TK, weights_TK, scores_TE, stream);
    case kBFloat16: return topk_dispatch_vpl<__nv_bfloat16>(logits_TE, T, E, K, fn, normalize, indices_TK, weights_TK, scores_TE, stream);
    default: return topk_dispatch_vpl<float>(logits_TE, T, E, K, fn, normalize, indices_TK, weights_TK, scores_TE, stream);
  }
}

int64_t locate_workspace_ints(int64_t T, int E, int K) {
  const int64_t NC = (T + kLocateChunk - 1) / kLocateChunk;
  return static_cast<int64_t>(E) * K * NC;
}

cudaError_t launch_locate(const int64_t* indices_TK, int64_t T, int E, int K, int64_t capacity,
                          int* workspace, int64_t* locations_TK, int64_t* counts_E,
                          int64_t* slots_TK, cudaStream_t stream) {
  if (E < 1 || E > kMaxLocateExperts || K < 0) return cudaErrorInvalidValue;
  if (T == 0 || K == 0) return cudaMemsetAsync(counts_E, 0, sizeof(int64_t) * E, stream);
  const int64_t NC = (T + kLocateChunk - 1) / kLocateChunk;
  hist_kernel<<<static_cast<unsigned>(NC), kLocateChunk, sizeof(int) * E, stream>>>(indices_TK, T, E, K, NC, workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  scan_hist_kernel<256><<<E, 256, 0, stream>>>(workspace, static_cast<int64_t>(K) * NC, counts_E);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem = (capacity < 0 ? sizeof(long long) * E : 0) + sizeof(int) * (kLocateChunk / 32) * E;
  locate_kernel<<<static_cast<unsigned>(NC), kLocateChunk, smem, stream>>>(
      indices_TK, T, E, K, NC, workspace, counts_E, capacity, locations_TK, slots_TK);
  return cudaGetLastError();
}

cudaError_t launch_scatter_rows(const void* src_TD, DType dt, const int64_t* slots_TK,
                                const void* w_TK, DType w_dt, const void* dot_RD, int64_t T, int K,
                                int64_t D, int64_t R, int* workspace, void* out_RD,
                                void* dot_out_TK, DType dot_dt, cudaStream_t stream) {
  switch (dt) {
    case kFloat16: return scatter_t<__half>(src_TD, slots_TK, w_TK, w_dt, dot_RD, T, K, D, R, workspace, out_RD, dot_out_TK, dot_dt, stream);
    case kBFloat16: return scatter_t<__nv_bfloat16>(src_TD, slots_TK, w_TK, w_dt, dot_RD, T, K, D, R, workspace, out_RD, dot_out_TK, dot_dt, stream);
    default: return scatter_t<float>(src_TD, slots_TK, w_TK, w_dt, dot_RD, T, K, D, R, workspace, out_RD, dot_out_TK, dot_dt, stream);
  }
}

cudaError_t launch_gather_rows(const void* src_RD, DType dt, const int64_t* slots_TK,
                               const void* w_TK, DType w_dt, const void* dot_TD, int64_t T, int K,
                               int64_t D, int64_t R, void* out_TD, void* dot_out_TK, DType dot_dt,
                               cudaStream_t stream) {
  switch (dt) {
    case kFloat16: return gather_t<__half>(src_RD, slots_TK, w_TK, w_dt, dot_TD, T, K, D, R, out_TD, dot_out_TK, dot_dt, stream);
    case kBFloat16: return gather_t<__nv_bfloat16>(src_RD, slots_TK, w_TK, w_dt, dot_TD, T, K, D, R, out_TD, dot_out_TK, dot_dt, stream);
    default: return gather_t<float>(src_RD, slots_TK, w_TK, w_dt, dot_TD, T, K, D, R, out_TD, dot_out_TK, dot_dt, stream);
  }
}

}  // namespace adaptmoe
