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
// host and a call can be captured in a CUDA graph. Each kernel runs one resident wave of blocks
// (occupancy x SMs) that find the selected experts themselves and split that work evenly, so
// there is no idle tail wave whatever the routing. The down projection writes fp32 partials per
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

constexpr int kUnroll = 4;   // weight packs in flight per lane and matrix row (raw, 4 registers each)

// A weight pack read once: cache-streaming, so the reused activations stay in L1. Kept raw until
// use, so many loads can be in flight without holding V floats each.
__device__ __forceinline__ int4 load_weights(const void* p) {
  return __ldcs(reinterpret_cast<const int4*>(p));
}

template <typename T, int V>
__device__ __forceinline__ void unpack(const int4& raw, float (&f)[V]) {
  static_assert(sizeof(T) * V == 16, "weight packs are 16 bytes");
  const Pack<T, V>& pk = *reinterpret_cast<const Pack<T, V>*>(&raw);
#pragma unroll
  for (int i = 0; i < V; ++i) f[i] = to_f<T>(pk.v[i]);
}

// Block-shared view of the routing: the selected experts (ascending) and the pairs of one expert.
struct Routing {
  unsigned bits[kMaxDecodeExperts / 32];
  int active[kMaxDecodePairs];
  int pairs[kMaxDecodePairs];
  int num_active;
  int num_pairs;
};

// All threads: the experts some pair selected, ascending, into r.active; returns their count A.
__device__ int collect_active(const int64_t* __restrict__ e_N, int N, int E, Routing& r) {
  const int words = (E + 31) / 32;
  for (int w = threadIdx.x; w < words; w += blockDim.x) r.bits[w] = 0u;
  __syncthreads();
  for (int n = threadIdx.x; n < N; n += blockDim.x) {
    const int64_t e = e_N[n];
    if (e >= 0 && e < E) atomicOr(&r.bits[e >> 5], 1u << (e & 31));
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int base = 0;
    for (int w0 = 0; w0 < words; w0 += 32) {
      unsigned word = w0 + lane < words ? r.bits[w0 + lane] : 0u;
      const int count = __popc(word);
      int inclusive = count;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const int v = __shfl_up_sync(kFull, inclusive, o);
        if (lane >= o) inclusive += v;
      }
      int pos = base + inclusive - count;
      for (; word != 0u; word &= word - 1u) r.active[pos++] = (w0 + lane) * 32 + __ffs(word) - 1;
      base += __shfl_sync(kFull, inclusive, 31);
    }
    if (lane == 0) r.num_active = base;
  }
  __syncthreads();
  return r.num_active;
}

// All threads: the pairs that selected expert e, in pair order, into r.pairs; returns their count.
__device__ int collect_pairs(const int64_t* __restrict__ e_N, int N, int e, Routing& r) {
  __syncthreads();  // the previous expert's pairs may still be read
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int base = 0;
    for (int i0 = 0; i0 < N; i0 += 32) {
      const int i = i0 + lane;
      const bool hit = i < N && e_N[i] == e;
      const unsigned mask = __ballot_sync(kFull, hit);
      if (hit) r.pairs[base + __popc(mask & ((1u << lane) - 1u))] = i;
      base += __popc(mask);
    }
    if (lane == 0) r.num_pairs = base;
  }
  __syncthreads();
  return r.num_pairs;
}

// Pairs that belong to real tokens: the first num_valid tokens' when a count is given (CUDA-graph
// buckets pad the batch; reading the count here saves the masking kernels before the op).
__device__ __forceinline__ int used_pairs(int N, int K, const int64_t* __restrict__ num_valid) {
  if (num_valid == nullptr) return N;
  const int64_t tokens = min(max(*num_valid, int64_t{0}), static_cast<int64_t>(N / max(K, 1)));
  return static_cast<int>(tokens * K);
}

// Contiguous share [begin, end) of `work` equal items for this block.
__device__ __forceinline__ void block_share(int64_t work, int64_t& begin, int64_t& end) {
  const int64_t per_block = (work + gridDim.x - 1) / gridDim.x;
  begin = min(work, blockIdx.x * per_block);
  end = min(work, begin + per_block);
}

// One warp: hidden units h0 .. h0+ROWS-1 of expert e for its m pairs; lanes split D.
template <typename T, int ROWS, bool GATED>
__device__ __forceinline__ void up_rows(const T* __restrict__ x_TD, const int* pairs, int m,
                                        const void* __restrict__ scale_N, int scale_dt, const T* __restrict__ w1_e,
                                        const T* __restrict__ w3_e, const T* __restrict__ b1_e, int K, int H,
                                        int D, int act, int h0, float (*sums)[ROWS * kGroup],
                                        T* __restrict__ h_NH) {
  constexpr int V = 16 / sizeof(T);
  constexpr int R3 = GATED ? ROWS : 1;
  const int lane = threadIdx.x & 31;
  for (int g0 = 0; g0 < m; g0 += kGroup) {
    const int gm = min(kGroup, m - g0);
    int token[kGroup];  // 32-bit: eight 64-bit row pointers would cost 16 registers
#pragma unroll
    for (int j = 0; j < kGroup; ++j) token[j] = pairs[g0 + min(j, gm - 1)] / K;
    float a1[ROWS][kGroup], a3[R3][kGroup];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) a1[r][j] = 0.f;
#pragma unroll
      for (int r = 0; r < R3; ++r) a3[r][j] = 0.f;
    }
    // Same loads in flight either way: gated rows read two matrices.
    constexpr int kSteps = GATED ? kUnroll / 2 : kUnroll;
    for (int d0 = lane * V; d0 < D; d0 += 32 * V * kSteps) {
      int4 raw1[kSteps][ROWS], raw3[kSteps][R3];
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        const int d = min(d0 + u * 32 * V, D - V);  // past D: a valid address, never used
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const size_t row = static_cast<size_t>(min(h0 + r, H - 1)) * D + d;  // rows past H: read, never written
          raw1[u][r] = load_weights(w1_e + row);
          if (GATED) raw3[u][r] = load_weights(w3_e + row);
        }
      }
#pragma unroll
      for (int u = 0; u < kSteps; ++u) {
        const int d = d0 + u * 32 * V;
        if (d >= D) break;
#pragma unroll
        for (int j = 0; j < kGroup; ++j) {
          if (j >= gm) break;
          float xv[V];
          load_pack<T, V>(x_TD + static_cast<size_t>(token[j]) * D + d, xv);
#pragma unroll
          for (int r = 0; r < ROWS; ++r) {
            float wv[V];
            unpack<T, V>(raw1[u][r], wv);
#pragma unroll
            for (int v = 0; v < V; ++v) a1[r][j] = fmaf(wv[v], xv[v], a1[r][j]);
            if (GATED) {
              unpack<T, V>(raw3[u][r], wv);
#pragma unroll
              for (int v = 0; v < V; ++v) a3[r][j] = fmaf(wv[v], xv[v], a3[r][j]);
            }
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
#pragma unroll
      for (int j = 0; j < kGroup; ++j) {
        if (j >= gm) break;  // uniform: only the pairs present are reduced
        const float g = warp_sum(a1[r][j]);
        const float u = GATED ? warp_sum(a3[r][j]) : 0.f;
        if (lane == 0) {
          sums[0][r * kGroup + j] = g;
          sums[1][r * kGroup + j] = u;
        }
      }
    }
    __syncwarp();
    // One lane per (row, pair): the activation is code-generated once, not ROWS * kGroup times.
    const int r = lane / kGroup, j = lane % kGroup, h = h0 + r;
    if (lane < ROWS * kGroup && j < gm && h < H) {
      const int n = pairs[g0 + j];
      const float s = scale_N != nullptr ? load_any(scale_N, scale_dt, n) : 1.f;
      const float bias = b1_e != nullptr ? to_f<T>(b1_e[h]) : 0.f;
      float v = activate(s * sums[0][lane] + bias, act);
      if (GATED) v *= s * sums[1][lane];
      h_NH[static_cast<size_t>(n) * H + h] = from_f<T>(v);
    }
    __syncwarp();  // sums is rewritten by the next group
  }
}

// Work item: one tile of kWarpsPerBlock * ROWS hidden units of one selected expert.
template <typename T, int ROWS, bool GATED>
__global__ void __launch_bounds__(kThreads, 2) decode_up_kernel(
    const T* __restrict__ x_TD, const int64_t* __restrict__ e_N, const void* __restrict__ scale_N,
    int scale_dt, const T* __restrict__ w1, const T* __restrict__ w3, const T* __restrict__ b1, int N,
    int K, int E, int H, int D, int act, const int64_t* __restrict__ num_valid, T* __restrict__ h_NH) {
  static_assert(ROWS * kGroup <= 32, "one lane per (row, pair) in the epilogue");
  __shared__ Routing r;
  __shared__ float sums[kWarpsPerBlock][2][ROWS * kGroup];
  N = used_pairs(N, K, num_valid);
  const int A = collect_active(e_N, N, E, r);
  const int warp = threadIdx.x >> 5;
  const int tiles = (H + kWarpsPerBlock * ROWS - 1) / (kWarpsPerBlock * ROWS);
  int64_t begin, end;
  block_share(static_cast<int64_t>(A) * tiles, begin, end);
  int e = -1, m = 0;
  for (int64_t t = begin; t < end; ++t) {
    const int a = static_cast<int>(t / tiles), tile = static_cast<int>(t % tiles);
    if (r.active[a] != e) {  // block-uniform: every thread takes the barriers inside
      e = r.active[a];
      m = collect_pairs(e_N, N, e, r);
    }
    const int h0 = (tile * kWarpsPerBlock + warp) * ROWS;
    if (h0 >= H) continue;
    const size_t expert = static_cast<size_t>(e) * H * D;
    up_rows<T, ROWS, GATED>(x_TD, r.pairs, m, scale_N, scale_dt, w1 + expert, GATED ? w3 + expert : nullptr,
                            b1 != nullptr ? b1 + static_cast<size_t>(e) * H : nullptr, K, H, D, act, h0,
                            sums[warp], h_NH);
  }
}

// The whole block: V columns per thread of one column block, hidden rows [h_begin, h_end), all m pairs.
template <typename T>
__device__ __forceinline__ void down_item(const T* __restrict__ h_NH, const int* pairs, int m,
                                          const T* __restrict__ w2_e, int N, int H, int O, int o, int h_begin,
                                          int h_end, int s, float (*hv)[kChunk], float* __restrict__ part_SNO) {
  constexpr int V = 16 / sizeof(T);
  const bool active = o < O;
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
      for (int c0u = 0; c0u < cn; c0u += 2 * kUnroll) {
        int4 raw[2 * kUnroll];
#pragma unroll
        for (int u = 0; u < 2 * kUnroll; ++u)
          raw[u] = load_weights(w2_e + static_cast<size_t>(c0 + min(c0u + u, cn - 1)) * O + o);
#pragma unroll
        for (int u = 0; u < 2 * kUnroll; ++u) {
          if (c0u + u >= cn) break;
          float wv[V];
          unpack<T, V>(raw[u], wv);
#pragma unroll
          for (int j = 0; j < kGroup; ++j) {
            if (j >= gm) break;
            const float a = hv[j][c0u + u];
#pragma unroll
            for (int v = 0; v < V; ++v) acc[j][v] = fmaf(a, wv[v], acc[j][v]);
          }
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

// Work item: (selected expert, column block of kThreads * V columns, hidden slice), slices fastest.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) decode_down_kernel(
    const T* __restrict__ h_NH, const int64_t* __restrict__ e_N, const T* __restrict__ w2, int N, int K, int E,
    int H, int O, int forced_splits, int max_splits, const int64_t* __restrict__ num_valid,
    float* __restrict__ part_SNO, int* __restrict__ splits_out) {
  constexpr int V = 16 / sizeof(T);
  __shared__ Routing r;
  __shared__ float hv[kGroup][kChunk];
  const int stride_N = N;  // partial rows stay indexed by the full pair count
  N = used_pairs(N, K, num_valid);
  const int A = collect_active(e_N, N, E, r);
  const int column_blocks = (O + kThreads * V - 1) / (kThreads * V);
  int S = forced_splits > 0 ? forced_splits : static_cast<int>(gridDim.x) / max(1, A * column_blocks);
  S = max(1, min(S, min(max_splits, H)));
  if (blockIdx.x == 0 && threadIdx.x == 0) *splits_out = S;
  int64_t begin, end;
  block_share(static_cast<int64_t>(A) * column_blocks * S, begin, end);
  int e = -1, m = 0;
  for (int64_t t = begin; t < end; ++t) {
    const int a = static_cast<int>(t / (static_cast<int64_t>(column_blocks) * S));
    const int rest = static_cast<int>(t % (static_cast<int64_t>(column_blocks) * S));
    const int c = rest / S, s = rest % S;
    if (r.active[a] != e) {  // block-uniform
      e = r.active[a];
      m = collect_pairs(e_N, N, e, r);
    }
    const int h_begin = static_cast<int>(static_cast<int64_t>(H) * s / S);
    const int h_end = static_cast<int>(static_cast<int64_t>(H) * (s + 1) / S);
    down_item<T>(h_NH, r.pairs, m, w2 + static_cast<size_t>(e) * H * O, stride_N, H, O, (c * kThreads + threadIdx.x) * V,
                 h_begin, h_end, s, hv, part_SNO);
  }
}

// One thread per output element. Grid: (O / threads, T).
template <typename T>
__global__ void decode_reduce_kernel(const float* __restrict__ part_SNO, const int64_t* __restrict__ e_N,
                                     const void* __restrict__ w_N, int w_dt, const T* __restrict__ b2, int K,
                                     int E, int64_t N, int64_t O, const int* __restrict__ splits_in,
                                     const int64_t* __restrict__ num_valid, void* __restrict__ y_TO, int out_dt) {
  const int64_t t = blockIdx.y;
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= O) return;
  const int splits = *splits_in;
  const int valid_k = num_valid != nullptr && t >= *num_valid ? 0 : K;  // padding tokens: zeros
  float acc = 0.f;
  for (int k = 0; k < valid_k; ++k) {
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


// Gated experts read two matrices per row: ROWS = 2 keeps the loads in flight per warp the same
// as 4 rows of one matrix would, and small tiles keep the blocks' shares even.
template <typename T, bool GATED>
void up_launch(const void* x, const int64_t* e_N, const void* scale_N, DType scale_dt, const void* w1,
               const void* w3, const void* b1, int64_t N, int K, int E, int64_t H, int64_t D, Activation act,
               const int64_t* num_valid, void* h, cudaStream_t stream) {
  constexpr int ROWS = 2;
  auto kernel = decode_up_kernel<T, ROWS, GATED>;
  static int blocks = resident_blocks(kernel, kThreads);
  kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), e_N, scale_N, scale_dt, static_cast<const T*>(w1),
                                          static_cast<const T*>(w3), static_cast<const T*>(b1), static_cast<int>(N), K,
                                          E, static_cast<int>(H), static_cast<int>(D), act, num_valid,
                                          static_cast<T*>(h));
}

template <typename T>
void up_for_type(const void* x, const int64_t* e_N, const void* scale_N, DType scale_dt, const void* w1,
                 const void* w3, const void* b1, int64_t N, int K, int E, int64_t H, int64_t D, Activation act,
                 const int64_t* num_valid, void* h, cudaStream_t stream) {
  if (w3 != nullptr) {
    up_launch<T, true>(x, e_N, scale_N, scale_dt, w1, w3, b1, N, K, E, H, D, act, num_valid, h, stream);
  } else {
    up_launch<T, false>(x, e_N, scale_N, scale_dt, w1, w3, b1, N, K, E, H, D, act, num_valid, h, stream);
  }
}

template <typename T>
int down_blocks() {
  static int blocks = resident_blocks(decode_down_kernel<T>, kThreads);
  return blocks;
}

template <typename T>
void down_for_type(const void* h, const int64_t* e_N, const void* w2, int64_t N, int K, int E, int64_t H,
                   int64_t O, int splits, int max_splits, const int64_t* num_valid, float* part, int* splits_out,
                   cudaStream_t stream) {
  decode_down_kernel<T><<<down_blocks<T>(), kThreads, 0, stream>>>(
      static_cast<const T*>(h), e_N, static_cast<const T*>(w2), static_cast<int>(N), K, E, static_cast<int>(H),
      static_cast<int>(O), splits, max_splits, num_valid, part, splits_out);
}

template <typename T>
int auto_max_splits(int64_t O) {
  constexpr int V = 16 / sizeof(T);
  const int64_t column_blocks = (O + kThreads * V - 1) / (kThreads * V);
  return static_cast<int>(std::max<int64_t>(1, down_blocks<T>() / column_blocks));
}


}  // namespace

cudaError_t launch_decode_up(const void* x_TD, DType dt, const int64_t* e_N, const void* scale_N,
                             DType scale_dt, const void* w1_EHD, const void* w3_EHD, const void* b1_EH,
                             int64_t N, int K, int E, int64_t H, int64_t D, Activation act,
                             const int64_t* num_valid, void* h_NH, cudaStream_t stream) {
  if (N == 0 || E == 0 || H == 0) return cudaSuccess;
  if (N > kMaxDecodePairs || E > kMaxDecodeExperts) return cudaErrorInvalidValue;
  switch (dt) {
    case kFloat16: up_for_type<__half>(x_TD, e_N, scale_N, scale_dt, w1_EHD, w3_EHD, b1_EH, N, K, E, H, D, act, num_valid, h_NH, stream); break;
    case kBFloat16: up_for_type<__nv_bfloat16>(x_TD, e_N, scale_N, scale_dt, w1_EHD, w3_EHD, b1_EH, N, K, E, H, D, act, num_valid, h_NH, stream); break;
    default: up_for_type<float>(x_TD, e_N, scale_N, scale_dt, w1_EHD, w3_EHD, b1_EH, N, K, E, H, D, act, num_valid, h_NH, stream);
  }
  return cudaGetLastError();
}

int decode_auto_max_splits(DType dt, int64_t O) {
  switch (dt) {
    case kFloat16: return auto_max_splits<__half>(O);
    case kBFloat16: return auto_max_splits<__nv_bfloat16>(O);
    default: return auto_max_splits<float>(O);
  }
}

cudaError_t launch_decode_down(const void* h_NH, DType dt, const int64_t* e_N, const void* w2_EHO,
                               int64_t N, int K, int E, int64_t H, int64_t O, int splits, int max_splits,
                               const int64_t* num_valid, float* part_SNO, int* splits_out, cudaStream_t stream) {
  if (N == 0 || E == 0 || O == 0) return cudaSuccess;
  if (N > kMaxDecodePairs || E > kMaxDecodeExperts || splits < 0 || max_splits < 1 || splits > max_splits)
    return cudaErrorInvalidValue;
  switch (dt) {
    case kFloat16: down_for_type<__half>(h_NH, e_N, w2_EHO, N, K, E, H, O, splits, max_splits, num_valid, part_SNO, splits_out, stream); break;
    case kBFloat16: down_for_type<__nv_bfloat16>(h_NH, e_N, w2_EHO, N, K, E, H, O, splits, max_splits, num_valid, part_SNO, splits_out, stream); break;
    default: down_for_type<float>(h_NH, e_N, w2_EHO, N, K, E, H, O, splits, max_splits, num_valid, part_SNO, splits_out, stream);
  }
  return cudaGetLastError();
}

cudaError_t launch_decode_reduce(const float* part_SNO, const int64_t* e_N, const void* w_N, DType w_dt,
                                 const void* b2_EO, DType dt, int64_t T, int K, int E, int64_t O,
                                 const int* splits_in, const int64_t* num_valid, void* y_TO, DType out_dt,
                                 cudaStream_t stream) {
  if (T == 0 || O == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((O + kThreads - 1) / kThreads), static_cast<unsigned>(T));
  const int64_t N = T * K;
  switch (dt) {
    case kFloat16:
      decode_reduce_kernel<__half><<<grid, kThreads, 0, stream>>>(part_SNO, e_N, w_N, w_dt, static_cast<const __half*>(b2_EO), K, E, N, O, splits_in, num_valid, y_TO, out_dt);
      break;
    case kBFloat16:
      decode_reduce_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(part_SNO, e_N, w_N, w_dt, static_cast<const __nv_bfloat16*>(b2_EO), K, E, N, O, splits_in, num_valid, y_TO, out_dt);
      break;
    default:
      decode_reduce_kernel<float><<<grid, kThreads, 0, stream>>>(part_SNO, e_N, w_N, w_dt, static_cast<const float*>(b2_EO), K, E, N, O, splits_in, num_valid, y_TO, out_dt);
  }
  return cudaGetLastError();
}

}  // namespace adaptmoe
