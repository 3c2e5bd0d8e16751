// adaptmoe decode kernels: the expert FFN of a few tokens, reading only the selected experts.
// Plain CUDA translation unit (no torch headers): `nvcc -arch=sm_90 -c decode_kernels.cu` checks it.
//
// Legend: T tokens, K top-k, N = T*K (token, choice) pairs, E experts, D model dim, H expert
// hidden, O output dim, S splits of H in the down projection, G pairs per pass (kGroup).
//
// Why not a grouped GEMM: with 1-16 rows per expert the GEMM tiles are mostly empty and the
// weight stream, which is the whole cost, runs at ~2 TB/s. Here each block streams a slice of one
// expert's weights once (16-byte loads, evict-first) and applies it to every pair of that
// expert; the pair list is built per block from the routing indices, so nothing waits for the
// host and a call can be captured in a CUDA graph. The down projection writes fp32 partials per
// hidden slice and a last kernel adds them in a fixed order: results are bitwise reproducible.
#include "moe_kernels.h"
#include "device_utils.cuh"

#include <algorithm>

namespace adaptmoe {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kGroup = 8;    // pairs per pass over an expert's weights (accumulators in registers)
constexpr int kChunk = 128;  // hidden rows of the down projection staged in shared memory per step

// A weight pack read once: cache-streaming, so the reused activations stay in L1.
template <typename T, int V>
__device__ __forceinline__ void load_weights(const T* p, float (&f)[V]) {
  static_assert(sizeof(T) * V == 16, "weight packs are 16 bytes");
  const int4 raw = __ldcs(reinterpret_cast<const int4*>(p));
  const Pack<T, V>& pk = *reinterpret_cast<const Pack<T, V>*>(&raw);
#pragma unroll
  for (int i = 0; i < V; ++i) f[i] = to_f<T>(pk.v[i]);
}

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

// The pairs that selected expert e, in pair order, into pairs[]; every thread gets their count.
__device__ int collect_pairs(const int64_t* __restrict__ e_N, int N, int e, int* pairs, int* count) {
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int base = 0;
    for (int i0 = 0; i0 < N; i0 += 32) {
      const int i = i0 + lane;
      const bool hit = i < N && e_N[i] == e;
      const unsigned mask = __ballot_sync(kFull, hit);
      if (hit) pairs[base + __popc(mask & ((1u << lane) - 1u))] = i;
      base += __popc(mask);
    }
    if (lane == 0) *count = base;
  }
  __syncthreads();
  return *count;
}

// One warp per ROWS hidden units of one expert; lanes split D. Grid: (H / (warps * ROWS), E).
template <typename T, int ROWS, bool GATED>
__global__ void __launch_bounds__(kThreads) decode_up_kernel(
    const T* __restrict__ x_TD, const int64_t* __restrict__ e_N, const void* __restrict__ scale_N,
    int scale_dt, const T* __restrict__ w1, const T* __restrict__ w3, const T* __restrict__ b1, int N,
    int K, int H, int D, int act, T* __restrict__ h_NH) {
  constexpr int V = 16 / sizeof(T);
  constexpr int R3 = GATED ? ROWS : 1;
  static_assert(ROWS * kGroup <= 32, "one lane per (row, pair) in the epilogue");
  __shared__ int pairs[kMaxDecodePairs];
  __shared__ int count;
  __shared__ float sums[kWarpsPerBlock][2][ROWS * kGroup];
  const int e = blockIdx.y;
  const int m = collect_pairs(e_N, N, e, pairs, &count);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int h0 = (blockIdx.x * kWarpsPerBlock + warp) * ROWS;
  if (m == 0 || h0 >= H) return;
  const T* w1_e = w1 + static_cast<size_t>(e) * H * D;
  const T* w3_e = GATED ? w3 + static_cast<size_t>(e) * H * D : nullptr;
  for (int g0 = 0; g0 < m; g0 += kGroup) {
    const int gm = min(kGroup, m - g0);
    const T* x_row[kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) x_row[j] = x_TD + static_cast<size_t>(pairs[g0 + min(j, gm - 1)] / K) * D;
    float a1[ROWS][kGroup], a3[R3][kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) a1[r][j] = 0.f;
#pragma unroll
      for (int r = 0; r < R3; ++r) a3[r][j] = 0.f;
    }
#pragma unroll 2
    for (int d = lane * V; d < D; d += 32 * V) {
      float wv1[ROWS][V], wv3[R3][V];
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const size_t row = static_cast<size_t>(min(h0 + r, H - 1)) * D + d;  // rows past H: read, never written
        load_weights<T, V>(w1_e + row, wv1[r]);
        if (GATED) load_weights<T, V>(w3_e + row, wv3[r]);
      }
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (j < gm) {
          float xv[V];
          load_pack<T, V>(x_row[j] + d, xv);
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
#pragma unroll
            for (int v = 0; v < V; ++v) {
              a1[r][j] = fmaf(wv1[r][v], xv[v], a1[r][j]);
              if (GATED) a3[r][j] = fmaf(wv3[r][v], xv[v], a3[r][j]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        const float g = warp_sum(a1[r][j]);
        const float u = GATED ? warp_sum(a3[r][j]) : 0.f;
        if (lane == 0) {
          sums[warp][0][r * kGroup + j] = g;
          sums[warp][1][r * kGroup + j] = u;
        }
      }
    }
    __syncwarp();
    // One lane per (row, pair): the activation is code-generated once, not ROWS * kGroup times.
    const int r = lane / kGroup, j = lane % kGroup, h = h0 + r;
    if (lane < ROWS * kGroup && j < gm && h < H) {
      const int n = pairs[g0 + j];
      const float s = scale_N != nullptr ? load_any(scale_N, scale_dt, n) : 1.f;
      const float bias = b1 != nullptr ? to_f<T>(b1[static_cast<size_t>(e) * H + h]) : 0.f;
      float v = activate(s * sums[warp][0][lane] + bias, act);
      if (GATED) v *= s * sums[warp][1][lane];
      h_NH[static_cast<size_t>(n) * H + h] = from_f<T>(v);
    }
    __syncwarp();  // sums is rewritten by the next group
  }
}

// Each thread V output columns of one expert over one hidden slice. Grid: (O / (threads * V), S, E).
template <typename T>
__global__ void __launch_bounds__(kThreads) decode_down_kernel(
    const T* __restrict__ h_NH, const int64_t* __restrict__ e_N, const T* __restrict__ w2, int N, int H,
    int O, int splits, float* __restrict__ part_SNO) {
  constexpr int V = 16 / sizeof(T);
  __shared__ int pairs[kMaxDecodePairs];
  __shared__ int count;
  __shared__ float hv[kGroup][kChunk];
  const int e = blockIdx.z, s = blockIdx.y;
  const int m = collect_pairs(e_N, N, e, pairs, &count);
  if (m == 0) return;  // the same for the whole block, so the barriers below stay matched
  const int h_begin = static_cast<int>(static_cast<int64_t>(H) * s / splits);
  const int h_end = static_cast<int>(static_cast<int64_t>(H) * (s + 1) / splits);
  const int o = (blockIdx.x * kThreads + threadIdx.x) * V;
  const bool active = o < O;
  const T* w2_e = w2 + static_cast<size_t>(e) * H * O;
  for (int g0 = 0; g0 < m; g0 += kGroup) {
    const int gm = min(kGroup, m - g0);
    float acc[kGroup][V];
#pragma unroll
    for (int j = 0; j < kGroup; ++j)
#pragma unroll
      for (int v = 0; v < V; ++v) acc[j][v] = 0.f;
    for (int c0 = h_begin; c0 < h_end; c0 += kChunk) {
      const int cn = min(kChunk, h_end - c0);
      __syncthreads();  // the previous chunk's readers are done with hv
      for (int i = threadIdx.x; i < kGroup * kChunk; i += kThreads) {
        const int j = i / kChunk, c = i % kChunk;
        hv[j][c] = (j < gm && c < cn) ? to_f<T>(h_NH[static_cast<size_t>(pairs[g0 + j]) * H + c0 + c]) : 0.f;
      }
      __syncthreads();
      if (!active) continue;
#pragma unroll 4
      for (int c = 0; c < cn; ++c) {
        float wv[V];
        load_weights<T, V>(w2_e + static_cast<size_t>(c0 + c) * O + o, wv);
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          const float a = hv[j][c];  // zero for j >= gm: a few idle FMAs instead of a branch
#pragma unroll
          for (int v = 0; v < V; ++v) acc[j][v] = fmaf(a, wv[v], acc[j][v]);
        }
      }
    }
    if (!active) continue;
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (j < gm) {
        float4* out = reinterpret_cast<float4*>(part_SNO + (static_cast<size_t>(s) * N + pairs[g0 + j]) * O + o);
#pragma unroll
        for (int v = 0; v < V; v += 4) out[v / 4] = make_float4(acc[j][v], acc[j][v + 1], acc[j][v + 2], acc[j][v + 3]);
      }
    }
  }
}

// One thread per output element. Grid: (O / threads, T).
template <typename T>
__global__ void decode_reduce_kernel(const float* __restrict__ part_SNO, const int64_t* __restrict__ e_N,
                                     const void* __restrict__ w_N, int w_dt, const T* __restrict__ b2, int K,
                                     int E, int64_t N, int64_t O, int splits, void* __restrict__ y_TO,
                                     int out_dt) {
  const int64_t t = blockIdx.y;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= O) return;
  float acc = 0.f;
  for (int k = 0; k < K; ++k) {
    const int64_t n = t * K + k;
    const int64_t e = e_N[n];
    if (e < 0 || e >= E) continue;
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += part_SNO[(s * N + n) * O + o];
    if (b2 != nullptr) v += to_f<T>(b2[e * O + o]);
    acc += (w_N != nullptr ? load_any(w_N, w_dt, n) : 1.f) * v;
  }
  store_any(y_TO, out_dt, t * O + o, acc);
}

template <typename T, int ROWS, bool GATED>
void up_launch(const void* x, const int64_t* e_N, const void* scale_N, DType scale_dt, const void* w1,
               const void* w3, const void* b1, int64_t N, int K, int E, int64_t H, int64_t D, Activation act,
               void* h, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((H + kWarpsPerBlock * ROWS - 1) / (kWarpsPerBlock * ROWS)), E);
  decode_up_kernel<T, ROWS, GATED><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(x), e_N, scale_N, scale_dt, static_cast<const T*>(w1), static_cast<const T*>(w3),
      static_cast<const T*>(b1), static_cast<int>(N), K, static_cast<int>(H), static_cast<int>(D), act,
      static_cast<T*>(h));
}

template <typename T>
void up_for_type(const void* x, const int64_t* e_N, const void* scale_N, DType scale_dt, const void* w1,
                 const void* w3, const void* b1, int64_t N, int K, int E, int64_t H, int64_t D, Activation act,
                 void* h, cudaStream_t stream) {
  // Gated reads two matrices per row: half the rows keep the loads in flight per warp the same.
  if (w3 != nullptr) {
    up_launch<T, 2, true>(x, e_N, scale_N, scale_dt, w1, w3, b1, N, K, E, H, D, act, h, stream);
  } else {
    up_launch<T, 4, false>(x, e_N, scale_N, scale_dt, w1, w3, b1, N, K, E, H, D, act, h, stream);
  }
}

template <typename T>
void down_for_type(const void* h, const int64_t* e_N, const void* w2, int64_t N, int E, int64_t H, int64_t O,
                   int splits, float* part, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  const dim3 grid(static_cast<unsigned>((O + kThreads * V - 1) / (kThreads * V)), splits, E);
  decode_down_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(h), e_N, static_cast<const T*>(w2),
                                                       static_cast<int>(N), static_cast<int>(H),
                                                       static_cast<int>(O), splits, part);
}

}  // namespace

cudaError_t launch_decode_up(const void* x_TD, DType dt, const int64_t* e_N, const void* scale_N,
                             DType scale_dt, const void* w1_EHD, const void* w3_EHD, const void* b1_EH,
                             int64_t N, int K, int E, int64_t H, int64_t D, Activation act, void* h_NH,
                             cudaStream_t stream) {
  if (N == 0 || E == 0 || H == 0) return cudaSuccess;
  if (N > kMaxDecodePairs) return cudaErrorInvalidValue;
  switch (dt) {
    case kFloat16: up_for_type<__half>(x_TD, e_N, scale_N, scale_dt, w1_EHD, w3_EHD, b1_EH, N, K, E, H, D, act, h_NH, stream); break;
    case kBFloat16: up_for_type<__nv_bfloat16>(x_TD, e_N, scale_N, scale_dt, w1_EHD, w3_EHD, b1_EH, N, K, E, H, D, act, h_NH, stream); break;
    default: up_for_type<float>(x_TD, e_N, scale_N, scale_dt, w1_EHD, w3_EHD, b1_EH, N, K, E, H, D, act, h_NH, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_decode_down(const void* h_NH, DType dt, const int64_t* e_N, const void* w2_EHO,
                               int64_t N, int E, int64_t H, int64_t O, int splits, float* part_SNO,
                               cudaStream_t stream) {
  if (N == 0 || E == 0 || O == 0) return cudaSuccess;
  if (N > kMaxDecodePairs || splits < 1 || splits > H) return cudaErrorInvalidValue;
  switch (dt) {
    case kFloat16: down_for_type<__half>(h_NH, e_N, w2_EHO, N, E, H, O, splits, part_SNO, stream); break;
    case kBFloat16: down_for_type<__nv_bfloat16>(h_NH, e_N, w2_EHO, N, E, H, O, splits, part_SNO, stream); break;
    default: down_for_type<float>(h_NH, e_N, w2_EHO, N, E, H, O, splits, part_SNO, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_decode_reduce(const float* part_SNO, const int64_t* e_N, const void* w_N, DType w_dt,
                                 const void* b2_EO, DType dt, int64_t T, int K, int E, int64_t O,
                                 int splits, void* y_TO, DType out_dt, cudaStream_t stream) {
  if (T == 0 || O == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((O + kThreads - 1) / kThreads), static_cast<unsigned>(T));
  const int64_t N = T * K;
  switch (dt) {
    case kFloat16:
      decode_reduce_kernel<__half><<<grid, kThreads, 0, stream>>>(part_SNO, e_N, w_N, w_dt, static_cast<const __half*>(b2_EO), K, E, N, O, splits, y_TO, out_dt);
      break;
    case kBFloat16:
      decode_reduce_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(part_SNO, e_N, w_N, w_dt, static_cast<const __nv_bfloat16*>(b2_EO), K, E, N, O, splits, y_TO, out_dt);
      break;
    default:
      decode_reduce_kernel<float><<<grid, kThreads, 0, stream>>>(part_SNO, e_N, w_N, w_dt, static_cast<const float*>(b2_EO), K, E, N, O, splits, y_TO, out_dt);
  }
  return cudaGetLastError();
}

}  // namespace adaptmoe
