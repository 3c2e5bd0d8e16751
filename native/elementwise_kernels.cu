// adaptmoe elementwise kernels: the gated FFN's product act(g) * u in one pass.
// Plain CUDA translation unit (no torch headers): `nvcc -arch=sm_90 -c elementwise_kernels.cu` checks it.
#include "moe_kernels.h"
#include "device_utils.cuh"

#include <algorithm>

namespace adaptmoe {
namespace {

constexpr int kThreads = 256;

// out[i] = act(g[i]) * u[i] in fp32, one rounding; V elements per thread and step.
template <typename T>
__global__ void act_mul_kernel(const T* __restrict__ g, const T* __restrict__ u, int64_t n, int act,
                               T* __restrict__ out) {
  constexpr int V = 16 / sizeof(T);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * V;
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * V; i < n; i += stride) {
    if (i + V <= n) {
      float gv[V], uv[V];
      load_pack<T, V>(g + i, gv);
      load_pack<T, V>(u + i, uv);
#pragma unroll
      for (int v = 0; v < V; ++v) gv[v] = activate(gv[v], act) * uv[v];
      store_pack<T, V>(out + i, gv);
    } else {
      for (int64_t j = i; j < n; ++j) out[j] = from_f<T>(activate(to_f<T>(g[j]), act) * to_f<T>(u[j]));
    }
  }
}

template <typename T>
void act_mul_for_type(const void* g, const void* u, int64_t n, int act, void* out, cudaStream_t stream) {
  constexpr int V = 16 / sizeof(T);
  static int blocks = resident_blocks(act_mul_kernel<T>, kThreads);
  const int64_t needed = (n + static_cast<int64_t>(kThreads) * V - 1) / (static_cast<int64_t>(kThreads) * V);
  act_mul_kernel<T><<<static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(needed, 4 * blocks))), kThreads, 0,
                      stream>>>(static_cast<const T*>(g), static_cast<const T*>(u), n, act, static_cast<T*>(out));
}

}  // namespace

cudaError_t launch_act_mul(const void* g, const void* u, DType dt, int64_t n, Activation act, void* out,
                           cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  switch (dt) {
    case kFloat16: act_mul_for_type<__half>(g, u, n, act, out, stream); break;
    case kBFloat16: act_mul_for_type<__nv_bfloat16>(g, u, n, act, out, stream); break;
    default: act_mul_for_type<float>(g, u, n, act, out, stream);
  }
  return cudaGetLastError();
}

}  // namespace adaptmoe
