// adaptmoe native kernels: fused gating + top-k and slot assignment (row movers: row_movers.cu).
// Plain CUDA translation unit (no torch headers): `nvcc -arch=sm_90 -c moe_kernels.cu` checks it.
//
// Legend: T tokens, E experts, K top-k, D model dim, R rows of the expert-major buffer,
// NC chunks of kLocateChunk tokens. All arithmetic accumulates in fp32; tensors keep their dtype.
#include "moe_kernels.h"
#include "device_utils.cuh"

#include <cub/block/block_reduce.cuh>
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
    float v[VPL], p[VPL];
    const unsigned padding = row_scores<T, VPL>(logits + t * E, E, lane, fn, v, p);
    topk_of_row<T, VPL>(t, num_tokens, v, p, padding, E, K, normalize, lane, indices, weights, scores, nullptr);
  }
}

// ---------------------------------------------------------------------------------------------
// Slot assignment. The passes have one block per chunk of kLocateChunk tokens (64 blocks for 8192
// tokens: a small grid, so each block's chain of memory latencies is the kernel's time); both
// load the expert choices of up to kPrefetch choices per token at once, not one per step (ncu,
// H100, fine-grained 8192 x top-8: 5.7 and 10.5 us before).
constexpr int kPrefetch = 8;

// Pass 1: per (expert, choice, chunk) counts, layout hist[e][k][c]; P <= kPrefetch choices per
// round (shared memory holds P x E counters).
__global__ void hist_kernel(const int64_t* __restrict__ idx, int64_t num_tokens, int E, int K,
                            int64_t NC, int P, int* __restrict__ hist) {
  extern __shared__ int s_hist[];  // P x E
  const int64_t c = blockIdx.x;
  const int64_t t = c * kLocateChunk + threadIdx.x;
  for (int k0 = 0; k0 < K; k0 += P) {
    const int nk = min(P, K - k0);
    int64_t ev[kPrefetch];
#pragma unroll
    for (int j = 0; j < kPrefetch; ++j) ev[j] = (j < nk && t < num_tokens) ? idx[t * K + k0 + j] : -1;
    for (int i = threadIdx.x; i < nk * E; i += blockDim.x) s_hist[i] = 0;
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kPrefetch; ++j) {
      if (ev[j] >= 0 && ev[j] < E) atomicAdd(&s_hist[j * E + ev[j]], 1);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nk * E; i += blockDim.x) {
      const int j = i / E, e = i - j * E;
      hist[(static_cast<int64_t>(e) * K + k0 + j) * NC + c] = s_hist[i];
    }
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
  // int offsets (T*K < 2^31): with int64 ones, 2048 experts needed more than 48 KB of shared memory
  int* s_off = reinterpret_cast<int*>(smem_raw);                  // E (dropless only)
  int* s_cnt = s_off + (capacity < 0 ? E : 0);                    // kWarps x E
  if (capacity < 0) {
    using Scan = cub::BlockScan<int, kLocateChunk>;
    __shared__ typename Scan::TempStorage tmp;
    int carry = 0;
    for (int b = 0; b < E; b += kLocateChunk) {
      const int e = b + threadIdx.x;
      const int x = e < E ? static_cast<int>(counts[e]) : 0;
      int excl, agg;
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
  for (int k0 = 0; k0 < K; k0 += kPrefetch) {
    int ev[kPrefetch], bv[kPrefetch];   // expert (-1: no token, -2: invalid, dropped), its base
#pragma unroll
    for (int j = 0; j < kPrefetch; ++j) {
      ev[j] = -1;
      if (k0 + j < K && t < num_tokens) {
        const int64_t x = idx[t * K + k0 + j];
        ev[j] = (x >= 0 && x < E) ? static_cast<int>(x) : -2;
      }
    }
#pragma unroll
    for (int j = 0; j < kPrefetch; ++j) {
      bv[j] = ev[j] >= 0 ? base[(static_cast<int64_t>(ev[j]) * K + k0 + j) * NC + c] : 0;
    }
#pragma unroll
    for (int j = 0; j < kPrefetch; ++j) {
      if (k0 + j >= K) break;   // the same for the whole block
      const int k = k0 + j, e = ev[j];
      const unsigned peers = __match_any_sync(kFull, e);
      const int lrank = __popc(peers & lower);
      const bool valid = e >= 0;
      if (valid && lrank == 0) s_cnt[w * E + e] = __popc(peers);
      __syncthreads();
      if (valid) {
        int pre = 0;
        for (int w2 = 0; w2 < w; ++w2) pre += s_cnt[w2 * E + e];
        const int64_t loc = bv[j] + pre + lrank;
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
}

// ---------------------------------------------------------------------------------------------
// GShard loss, pass 1: one warp per token (lane holds experts lane, lane+32, ...); block b writes
// its column sums of p and its first-choice counts to part[b][0:E] and part[b][E:2E]. Warps keep
// their own sums and are added in warp order: no float atomics, so the bits do not depend on
// scheduling.
template <typename T, int VPL>
__global__ void gshard_partials_kernel(const T* __restrict__ scores, const int64_t* __restrict__ indices,
                                       int64_t num_tokens, int E, int K, bool normalize_rows,
                                       float* __restrict__ part) {
  extern __shared__ float s_warp[];   // warps x E column sums
  __shared__ int s_first[kMaxTopkExperts];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  for (int e = threadIdx.x; e < E; e += blockDim.x) s_first[e] = 0;
  __syncthreads();
  float col[VPL];
#pragma unroll
  for (int j = 0; j < VPL; ++j) col[j] = 0.f;
  // U tokens per iteration, their loads issued together: one token at a time left this kernel
  // waiting on memory latency (~6 us for 8192 tokens on the H100 at 128 blocks).
  constexpr int U = VPL <= 2 ? 8 : (VPL <= 8 ? 4 : 1);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps;
  for (int64_t t0 = static_cast<int64_t>(blockIdx.x) * warps + warp; t0 < num_tokens; t0 += stride * U) {
    float v[U][VPL];
    int64_t first[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = t0 + u * stride;
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const int e = j * 32 + lane;
        v[u][j] = (t < num_tokens && e < E) ? to_f<T>(scores[t * E + e]) : 0.f;
      }
      first[u] = (lane == 0 && t < num_tokens) ? indices[t * K] : -1;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (t0 + u * stride >= num_tokens) break;   // the same for the whole warp
      if (normalize_rows) {
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < VPL; ++j) sum += v[u][j];
        const float inv = 1.f / fmaxf(warp_sum(sum), 1e-9f);
#pragma unroll
        for (int j = 0; j < VPL; ++j) v[u][j] *= inv;
      }
#pragma unroll
      for (int j = 0; j < VPL; ++j) col[j] += v[u][j];
      if (first[u] >= 0 && first[u] < E) atomicAdd(&s_first[first[u]], 1);
    }
  }
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    const int e = j * 32 + lane;
    if (e < E) s_warp[warp * E + e] = col[j];
  }
  __syncthreads();
  float* out = part + static_cast<int64_t>(blockIdx.x) * 2 * E;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    float c = 0.f;
    for (int w = 0; w < warps; ++w) c += s_warp[w * E + e];
    out[e] = c;
    out[E + e] = static_cast<float>(s_first[e]);
  }
}

// Pass 2, one block: loss = E / T^2 * sum_e colsum_e * first_e over the blocks' partials.
// Thread (s, e) sums the partials of blocks s, s + S, ... (S slices per expert, a function of E
// only), then the slices are added in slice order: the bits depend on T and E only. One thread
// per expert walking all blocks took ~9 us (a chain of dependent loads).
template <int BT>
__global__ void gshard_finish_kernel(const float* __restrict__ part, int blocks, int E, int64_t num_tokens,
                                     float* __restrict__ loss) {
  using Reduce = cub::BlockReduce<float, BT>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ float s_c[BT], s_n[BT];
  const int S = max(1, min(32, BT / E));   // slices per expert
  const int per_pass = BT / S;                        // experts per pass
  const int s = threadIdx.x / per_pass, i = threadIdx.x % per_pass;
  float term = 0.f;
  for (int e0 = 0; e0 < E; e0 += per_pass) {
    const int e = e0 + i;
    float c = 0.f, n = 0.f;
    if (s < S && e < E) {
      for (int b = s; b < blocks; b += S) {
        c += part[static_cast<int64_t>(b) * 2 * E + e];
        n += part[static_cast<int64_t>(b) * 2 * E + E + e];
      }
    }
    s_c[threadIdx.x] = c;
    s_n[threadIdx.x] = n;
    __syncthreads();
    if (s == 0 && e < E) {
      float ct = 0.f, nt = 0.f;
      for (int j = 0; j < S; ++j) {
        ct += s_c[j * per_pass + i];
        nt += s_n[j * per_pass + i];
      }
      term += ct * nt;
    }
    __syncthreads();
  }
  const float total = Reduce(tmp).Sum(term);
  if (threadIdx.x == 0) {
    const float Tf = static_cast<float>(num_tokens);
    *loss = num_tokens > 0 ? total / Tf * (static_cast<float>(E) / Tf) : 0.f;
  }
}

constexpr int kLossThreads = 256;
constexpr int kLossFinishThreads = 1024;

// Blocks of pass 1: at least 32 tokens per block, at most 128 blocks (pass 2 reads 128 x 2E
// floats); a function of T only, so the summation order is too.
int gshard_loss_blocks(int64_t T) {
  return static_cast<int>(std::min<int64_t>(128, std::max<int64_t>(1, (T + 31) / 32)));
}

template <typename T, int VPL>
cudaError_t gshard_partials_t(const void* scores, const int64_t* indices, int64_t T_, int E, int K, bool normalize_rows,
                              float* part, cudaStream_t stream) {
  const size_t smem = sizeof(float) * (kLossThreads / 32) * E;
  gshard_partials_kernel<T, VPL><<<gshard_loss_blocks(T_), kLossThreads, smem, stream>>>(
      static_cast<const T*>(scores), indices, T_, E, K, normalize_rows, part);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gshard_partials_vpl(const void* scores, const int64_t* indices, int64_t T_, int E, int K,
                                bool normalize_rows, float* part, cudaStream_t stream) {
  if (E <= 32) return gshard_partials_t<T, 1>(scores, indices, T_, E, K, normalize_rows, part, stream);
  if (E <= 64) return gshard_partials_t<T, 2>(scores, indices, T_, E, K, normalize_rows, part, stream);
  if (E <= 128) return gshard_partials_t<T, 4>(scores, indices, T_, E, K, normalize_rows, part, stream);
  if (E <= 256) return gshard_partials_t<T, 8>(scores, indices, T_, E, K, normalize_rows, part, stream);
  if (E <= 512) return gshard_partials_t<T, 16>(scores, indices, T_, E, K, normalize_rows, part, stream);
  return gshard_partials_t<T, 32>(scores, indices, T_, E, K, normalize_rows, part, stream);
}

// ---------------------------------------------------------------------------------------------
// host helpers
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

int64_t gshard_loss_workspace_floats(int64_t T, int E) { return static_cast<int64_t>(gshard_loss_blocks(T)) * 2 * E; }

cudaError_t launch_gshard_loss(const void* scores_TE, DType dt, const int64_t* indices_TK, int64_t T, int E, int K,
                               bool normalize_rows, float* workspace, float* loss, cudaStream_t stream) {
  if (E < 1 || E > kMaxTopkExperts || K < 1) return cudaErrorInvalidValue;
  if (T == 0) return cudaMemsetAsync(loss, 0, sizeof(float), stream);   // 0.0f is all zero bits
  cudaError_t err;
  switch (dt) {
    case kFloat16: err = gshard_partials_vpl<__half>(scores_TE, indices_TK, T, E, K, normalize_rows, workspace, stream); break;
    case kBFloat16: err = gshard_partials_vpl<__nv_bfloat16>(scores_TE, indices_TK, T, E, K, normalize_rows, workspace, stream); break;
    default: err = gshard_partials_vpl<float>(scores_TE, indices_TK, T, E, K, normalize_rows, workspace, stream);
  }
  if (err != cudaSuccess) return err;
  gshard_finish_kernel<kLossFinishThreads><<<1, kLossFinishThreads, 0, stream>>>(workspace, gshard_loss_blocks(T), E, T, loss);
  return cudaGetLastError();
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
  // Choices per round of pass 1: its P x E counters stay within 48 KB of shared memory.
  const int P = std::max(1, std::min({K, kPrefetch, 12288 / E}));
  hist_kernel<<<static_cast<unsigned>(NC), kLocateChunk, sizeof(int) * P * E, stream>>>(indices_TK, T, E, K, NC, P,
                                                                                       workspace);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  scan_hist_kernel<256><<<E, 256, 0, stream>>>(workspace, static_cast<int64_t>(K) * NC, counts_E);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t smem = (capacity < 0 ? sizeof(int) * E : 0) + sizeof(int) * (kLocateChunk / 32) * E;
  locate_kernel<<<static_cast<unsigned>(NC), kLocateChunk, smem, stream>>>(
      indices_TK, T, E, K, NC, workspace, counts_E, capacity, locations_TK, slots_TK);
  return cudaGetLastError();
}

}  // namespace adaptmoe
