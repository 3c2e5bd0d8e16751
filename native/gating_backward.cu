// adaptmoe native kernels: the backward of the fused gating (scores + top-k weights) and of the
// GShard balance loss.
// Plain CUDA translation unit (no torch headers): `nvcc -arch=sm_90 -c gating_backward.cu` checks it.
//
// Legend: T tokens, E experts, K top-k. All arithmetic in fp32; tensors keep their dtype.
//
// Why one kernel: the PyTorch form of this gradient is ~17 ops (scores recomputed, gathered,
// renormalised, scattered, the softmax backward), ~0.3 ms of host time per training step on the
// H100 machine, which a layer whose GPU work is short (Tutel's README layer in bf16: ~1.5 ms per
// step) waits for.
#include "moe_kernels.h"
#include "device_utils.cuh"

#include <cfloat>

namespace adaptmoe {
namespace {

// Element j of a lane's VPL values, for an index every lane of the warp agrees on (no dynamic
// register indexing, which would move the arrays to local memory).
template <int VPL>
__device__ __forceinline__ float pick(const float (&a)[VPL], int j) {
  float out = 0.f;
#pragma unroll
  for (int i = 0; i < VPL; ++i) out = i == j ? a[i] : out;
  return out;
}

template <int VPL>
__device__ __forceinline__ void add_at(float (&a)[VPL], int j, float value) {
#pragma unroll
  for (int i = 0; i < VPL; ++i) a[i] += i == j ? value : 0.f;
}

// The score of expert e (0 <= e < E) from the lane that holds it.
template <int VPL>
__device__ __forceinline__ float score_of(const float (&p)[VPL], int e) {
  return __shfl_sync(kFull, pick(p, e >> 5), e & 31);
}

// One warp per token: p recomputed as the forward computed it (row_scores); g = grad_scores (0
// when null) plus each chosen expert's weight gradient, through the renormalisation when
// `normalize` (w_k = p_k / sum_j p_j, the sum clamped at FLT_MIN); then the softmax or sigmoid
// backward. Indices outside [0, E) add nothing.
template <typename T, int VPL>
__global__ void topk_backward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ indices,
                                     const T* __restrict__ grad_w, const T* __restrict__ grad_scores,
                                     int64_t num_tokens, int E, int K, int fn, bool normalize,
                                     T* __restrict__ grad_logits) {
  const int lane = threadIdx.x & 31;
  const int64_t warps_per_block = blockDim.x >> 5;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * warps_per_block;
  for (int64_t t = blockIdx.x * warps_per_block + (threadIdx.x >> 5); t < num_tokens; t += stride) {
    float v[VPL], p[VPL], g[VPL];
    const unsigned padding = row_scores<T, VPL>(logits + t * E, E, lane, fn, v, p);
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const int e = j * 32 + lane;
      g[j] = (grad_scores != nullptr && e < E) ? to_f<T>(grad_scores[t * E + e]) : 0.f;
    }
    if (grad_w != nullptr) {
      const int64_t* idx = indices + t * K;
      const T* gw = grad_w + t * K;
      float total = 1.f, dot = 0.f;   // the renormalisation's sum and sum_k gw_k * w_k
      if (normalize) {
        total = 0.f;
        for (int k = 0; k < K; ++k) {
          const int64_t e = idx[k];
          if (e >= 0 && e < E) total += score_of(p, static_cast<int>(e));
        }
        total = fmaxf(total, FLT_MIN);
        for (int k = 0; k < K; ++k) {
          const int64_t e = idx[k];
          if (e >= 0 && e < E) dot += to_f<T>(gw[k]) * score_of(p, static_cast<int>(e)) / total;
        }
      }
      for (int k = 0; k < K; ++k) {
        const int64_t e = idx[k];
        if (e < 0 || e >= E || (e & 31) != lane) continue;
        add_at(g, static_cast<int>(e >> 5), normalize ? (to_f<T>(gw[k]) - dot) / total : to_f<T>(gw[k]));
      }
    }
    float gp = 0.f;   // softmax: sum_e g_e p_e
    if (fn == kSoftmax) {
#pragma unroll
      for (int j = 0; j < VPL; ++j) gp += g[j] * p[j];
      gp = warp_sum(gp);
    }
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      if (padding >> j & 1u) continue;
      const float d = fn == kSoftmax ? p[j] * (g[j] - gp) : g[j] * p[j] * (1.f - p[j]);
      grad_logits[t * E + j * 32 + lane] = from_f<T>(d);
    }
  }
}

template <typename T, int VPL>
cudaError_t topk_backward_t(const void* logits, const int64_t* indices, const void* grad_w, const void* grad_scores,
                            int64_t T_, int E, int K, ScoreFn fn, bool normalize, void* grad_logits,
                            cudaStream_t stream) {
  constexpr int kThreads = 256;
  int64_t blocks = (T_ + kThreads / 32 - 1) / (kThreads / 32);
  if (blocks > 8192) blocks = 8192;
  topk_backward_kernel<T, VPL><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), indices, static_cast<const T*>(grad_w), static_cast<const T*>(grad_scores), T_,
      E, K, fn, normalize, static_cast<T*>(grad_logits));
  return cudaGetLastError();
}

template <typename T>
cudaError_t topk_backward_vpl(const void* logits, const int64_t* indices, const void* grad_w, const void* grad_scores,
                              int64_t T_, int E, int K, ScoreFn fn, bool normalize, void* grad_logits,
                              cudaStream_t stream) {
#define ADAPTMOE_TOPK_BWD(VPL) \
  topk_backward_t<T, VPL>(logits, indices, grad_w, grad_scores, T_, E, K, fn, normalize, grad_logits, stream)
  if (E <= 32) return ADAPTMOE_TOPK_BWD(1);
  if (E <= 64) return ADAPTMOE_TOPK_BWD(2);
  if (E <= 128) return ADAPTMOE_TOPK_BWD(4);
  if (E <= 256) return ADAPTMOE_TOPK_BWD(8);
  if (E <= 512) return ADAPTMOE_TOPK_BWD(16);
  return ADAPTMOE_TOPK_BWD(32);
#undef ADAPTMOE_TOPK_BWD
}

// d (GShard loss) / d scores: loss = E / T^2 * sum_e c_e * sum_t p_te with c_e the tokens whose
// first choice is e, so every row of the gradient is g * E * c_e / T^2. Each block counts the
// first choices itself (shared memory, E ints; the indices are read from L2 by every block),
// then writes its share of the rows.
template <typename T>
__global__ void gshard_loss_backward_kernel(const int64_t* __restrict__ indices, int64_t num_tokens, int E, int K,
                                            const float* __restrict__ grad, T* __restrict__ grad_scores) {
  extern __shared__ int s_counts[];   // E
  for (int e = threadIdx.x; e < E; e += blockDim.x) s_counts[e] = 0;
  __syncthreads();
  for (int64_t t = threadIdx.x; t < num_tokens; t += blockDim.x) {
    const int64_t e = indices[t * K];
    if (e >= 0 && e < E) atomicAdd(&s_counts[e], 1);
  }
  __syncthreads();
  const float scale = *grad * static_cast<float>(E) / (static_cast<float>(num_tokens) * static_cast<float>(num_tokens));
  const int64_t n = num_tokens * E;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    grad_scores[i] = from_f<T>(scale * static_cast<float>(s_counts[i % E]));
  }
}

template <typename T>
cudaError_t gshard_loss_backward_t(const int64_t* indices, int64_t T_, int E, int K, const float* grad,
                                   void* grad_scores, cudaStream_t stream) {
  constexpr int kThreads = 256;
  int64_t blocks = (T_ * E + kThreads * 8 - 1) / (kThreads * 8);
  blocks = blocks < 1 ? 1 : (blocks > 132 ? 132 : blocks);
  gshard_loss_backward_kernel<T><<<static_cast<unsigned>(blocks), kThreads, E * sizeof(int), stream>>>(
      indices, T_, E, K, grad, static_cast<T*>(grad_scores));
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_topk_backward(const void* logits_TE, DType dt, const int64_t* indices_TK, const void* grad_w_TK,
                                 const void* grad_scores_TE, int64_t T, int E, int K, ScoreFn fn, bool normalize,
                                 void* grad_logits_TE, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (E < 1 || E > kMaxTopkExperts || K < 1 || K > E) return cudaErrorInvalidValue;
  switch (dt) {
    case kFloat16:
      return topk_backward_vpl<__half>(logits_TE, indices_TK, grad_w_TK, grad_scores_TE, T, E, K, fn, normalize,
                                       grad_logits_TE, stream);
    case kBFloat16:
      return topk_backward_vpl<__nv_bfloat16>(logits_TE, indices_TK, grad_w_TK, grad_scores_TE, T, E, K, fn,
                                              normalize, grad_logits_TE, stream);
    default:
      return topk_backward_vpl<float>(logits_TE, indices_TK, grad_w_TK, grad_scores_TE, T, E, K, fn, normalize,
                                      grad_logits_TE, stream);
  }
}

cudaError_t launch_gshard_loss_backward(const int64_t* indices_TK, int64_t T, int E, int K, const float* grad,
                                        DType dt, void* grad_scores_TE, cudaStream_t stream) {
  if (T == 0) return cudaSuccess;
  if (E < 1 || E > kMaxTopkExperts || K < 1) return cudaErrorInvalidValue;
  switch (dt) {
    case kFloat16: return gshard_loss_backward_t<__half>(indices_TK, T, E, K, grad, grad_scores_TE, stream);
    case kBFloat16: return gshard_loss_backward_t<__nv_bfloat16>(indices_TK, T, E, K, grad, grad_scores_TE, stream);
    default: return gshard_loss_backward_t<float>(indices_TK, T, E, K, grad, grad_scores_TE, stream);
  }
}

}  // namespace adaptmoe
