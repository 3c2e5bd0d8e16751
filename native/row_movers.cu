// adaptmoe native kernels: dispatch/combine row movers (expert-major <-> token-major rows).
// Plain CUDA translation unit (no torch headers): `nvcc -arch=sm_90 -c row_movers.cu` checks it.
//
// Legend: T tokens, K top-k, D model dim, R rows of the expert-major buffer. All arithmetic
// accumulates in fp32; tensors keep their dtype.
#include "moe_kernels.h"
#include "device_utils.cuh"

#include <algorithm>
#include <cstdint>

namespace adaptmoe {
namespace {

// ---------------------------------------------------------------------------------------------
// Row movers.
// Token-major scatter: one block per token; its row is read from memory once (the K stores of
// the plain kernel reuse the registers) and each kept choice's row is written with streaming
// stores. H100 (scripts/explore_dispatch.py): fine64 117 us vs 175 us for one block per output
// row reading its token through an inverse map (K reads per token), DeepSeek-V3 763 vs 1388 us.
// Rows no choice feeds are zeroed by zero_rows_kernel through the inverse map.
__global__ void inverse_slots_kernel(const int64_t* __restrict__ slots, int64_t n, int64_t R,
                                     int* __restrict__ inv, int64_t* __restrict__ fill_E = nullptr, int64_t E = 0,
                                     int64_t fill_value = 0) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    const int64_t s = slots[i];
    if (s >= 0 && s < R) inv[s] = static_cast<int>(i);
  }
  if (fill_E != nullptr && i < E) fill_E[i] = fill_value;
}

__global__ void token_major_slots_kernel(const int64_t* __restrict__ indices, int64_t n, int K, int64_t T, int E,
                                         int64_t* __restrict__ slots) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    const int64_t e = indices[i];
    slots[i] = (e >= 0 && e < E) ? e * T + i / K : -1;
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

// Which rows of the expert-major buffer no choice feeds, for zero_rows_kernel.
// Through the inverse map (any slots): inv[r] < 0.
struct UnfedByInverse {
  const int* __restrict__ inv;
  __device__ __forceinline__ bool operator()(int64_t r) const { return inv[r] < 0; }
};
// Slots of the slot assignment (launch_locate, capacity C > 0), no inverse map needed: expert e's
// kept choices fill rows e*C + [0, min(counts[e], C)), the rest of its C rows are unfed.
struct UnfedByCounts {
  const int64_t* __restrict__ counts;
  int64_t C;
  __device__ __forceinline__ bool operator()(int64_t r) const {
    const int64_t e = r / C;
    return r - e * C >= counts[e];
  }
};

// One warp per row (grid-stride): the rows `unfed` names become 0.
template <typename T, int N, typename Unfed>
__global__ void zero_rows_kernel(Unfed unfed, int64_t R, int64_t D, T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  float z[N];
#pragma unroll
  for (int j = 0; j < N; ++j) z[j] = 0.f;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); r < R; r += warps) {
    if (!unfed(r)) continue;
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
  zero_rows_kernel<T, N><<<static_cast<unsigned>(zero_blocks), 256, 0, stream>>>(UnfedByInverse{inv}, R, D, out);
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

template <typename T, int N>
cudaError_t scatter_located_n(const T* src, const int64_t* slots, const void* w, DType w_dt, int64_t T_, int K,
                              int64_t D, int64_t capacity, const int64_t* counts, int64_t R, bool zero_unfed, T* out,
                              cudaStream_t stream) {
  if (T_ > 0) {
    const size_t smem = static_cast<size_t>(K) * (sizeof(int64_t) + sizeof(float));
    scatter_by_tokens_kernel<T, N><<<static_cast<unsigned>(T_), token_threads(D / N), smem, stream>>>(
        src, slots, w, w_dt, K, D, R, out);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // dropless: every one of the T*K rows is fed; !zero_unfed: the caller never reads unfed rows
  if (capacity < 0 || !zero_unfed) return cudaSuccess;
  const int64_t zero_blocks = std::min<int64_t>((R + 7) / 8, 132 * 16);
  zero_rows_kernel<T, N><<<static_cast<unsigned>(zero_blocks), 256, 0, stream>>>(UnfedByCounts{counts, capacity}, R,
                                                                                  D, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t scatter_located_t(const void* src, const int64_t* slots, const void* w, DType w_dt, int64_t T_, int K,
                              int64_t D, int64_t capacity, const int64_t* counts, int64_t R, bool zero_unfed,
                              void* out, cudaStream_t stream) {
  if (R == 0 || D == 0) return cudaSuccess;
  constexpr int NV = 16 / static_cast<int>(sizeof(T));
  const T* s = static_cast<const T*>(src);
  T* o = static_cast<T*>(out);
  if (D % NV == 0 && aligned16(src) && aligned16(out)) {
    return scatter_located_n<T, NV>(s, slots, w, w_dt, T_, K, D, capacity, counts, R, zero_unfed, o, stream);
  }
  return scatter_located_n<T, 1>(s, slots, w, w_dt, T_, K, D, capacity, counts, R, zero_unfed, o, stream);
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

cudaError_t launch_inverse_slots(const int64_t* slots_TK, int64_t n, int64_t R, int* inv_R, cudaStream_t stream,
                                 int64_t* fill_E, int64_t E, int64_t fill_value) {
  const int64_t threads = std::max(n, fill_E != nullptr ? E : 0);
  if (threads == 0) return cudaSuccess;
  inverse_slots_kernel<<<static_cast<unsigned>((threads + 255) / 256), 256, 0, stream>>>(slots_TK, n, R, inv_R, fill_E,
                                                                                          E, fill_value);
  return cudaGetLastError();
}

cudaError_t launch_token_major_slots(const int64_t* indices_TK, int64_t T, int K, int E, int64_t* slots_TK,
                                     cudaStream_t stream) {
  const int64_t n = T * K;
  if (n == 0) return cudaSuccess;
  token_major_slots_kernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(indices_TK, n, K, T, E, slots_TK);
  return cudaGetLastError();
}

cudaError_t launch_scatter_located_rows(const void* src_TD, DType dt, const int64_t* slots_TK, const void* w_TK,
                                        DType w_dt, int64_t T, int K, int64_t D, int64_t capacity,
                                        const int64_t* counts_E, int64_t E, bool zero_unfed, void* out_RD,
                                        cudaStream_t stream) {
  const int64_t R = capacity < 0 ? T * K : E * capacity;
  switch (dt) {
    case kFloat16: return scatter_located_t<__half>(src_TD, slots_TK, w_TK, w_dt, T, K, D, capacity, counts_E, R, zero_unfed, out_RD, stream);
    case kBFloat16: return scatter_located_t<__nv_bfloat16>(src_TD, slots_TK, w_TK, w_dt, T, K, D, capacity, counts_E, R, zero_unfed, out_RD, stream);
    default: return scatter_located_t<float>(src_TD, slots_TK, w_TK, w_dt, T, K, D, capacity, counts_E, R, zero_unfed, out_RD, stream);
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
