// See triton_launch.h. The driver's cuLaunchKernel comes from libcuda by dlsym (as Triton's own
// launcher does): no link-time dependency on the driver library.
#include "triton_launch.h"

#include <cuda.h>
#include <dlfcn.h>

#include <cstring>
#include <deque>
#include <mutex>

namespace adaptmoe {
namespace {

struct TritonKernel {
  CUfunction function = nullptr;
  unsigned threads = 0, shared_bytes = 0;
  std::vector<std::string> param_names;
  std::vector<int64_t> param_kinds;
  std::vector<bool> param_div16;
  std::vector<std::string> const_names;
  std::vector<int64_t> const_values;
};

// Append-only: launches read entries without the lock (a deque never moves its elements).
std::deque<TritonKernel>& registry() {
  static std::deque<TritonKernel> kernels;
  return kernels;
}
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}

const TritonKernel* kernel_of(int64_t id) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  return id >= 0 && id < static_cast<int64_t>(registry().size()) ? &registry()[id] : nullptr;
}

const int64_t* find_arg(const TritonArgs& args, const std::string& name) {
  for (const auto& a : args) {
    if (name == a.first) return &a.second;
  }
  return nullptr;
}

using LaunchFn = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                              CUstream, void**, void**);

LaunchFn driver_launch() {
  static LaunchFn fn = []() -> LaunchFn {
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (lib == nullptr) lib = dlopen("libcuda.so.1", RTLD_NOW);
    return lib == nullptr ? nullptr : reinterpret_cast<LaunchFn>(dlsym(lib, "cuLaunchKernel"));
  }();
  return fn;
}

// Whether a kernel compiled with this parameter computes right for value v: what it assumed holds
// (a multiple of 16 when div16; an i32 parameter holds v). Triton may have compiled a faster
// variant for v (e.g. with divisibility it lacks here); that one is not required.
bool value_fits(int64_t v, int64_t kind, bool div16) {
  if (div16 && v % 16 != 0) return false;
  return kind != kTritonI32 || (v >= INT32_MIN && v <= INT32_MAX);
}

}  // namespace

int64_t register_triton_kernel(int64_t function, int64_t num_warps, int64_t shared_bytes,
                               std::vector<std::string> param_names, std::vector<int64_t> param_kinds,
                               std::vector<bool> param_div16, std::vector<std::string> const_names,
                               std::vector<int64_t> const_values) {
  if (function == 0 || num_warps < 1 || num_warps > 32 || shared_bytes < 0 ||
      param_kinds.size() != param_names.size() || param_div16.size() != param_names.size() ||
      const_values.size() != const_names.size()) {
    return -1;
  }
  for (int64_t kind : param_kinds) {
    if (kind != kTritonPtr && kind != kTritonI32 && kind != kTritonI64) return -1;
  }
  TritonKernel k;
  k.function = reinterpret_cast<CUfunction>(static_cast<uintptr_t>(function));
  k.threads = static_cast<unsigned>(32 * num_warps);
  k.shared_bytes = static_cast<unsigned>(shared_bytes);
  k.param_names = std::move(param_names);
  k.param_kinds = std::move(param_kinds);
  k.param_div16 = std::move(param_div16);
  k.const_names = std::move(const_names);
  k.const_values = std::move(const_values);
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().push_back(std::move(k));
  return static_cast<int64_t>(registry().size()) - 1;
}

bool triton_kernel_matches(int64_t id, const TritonArgs& args) {
  const TritonKernel* k = kernel_of(id);
  if (k == nullptr || driver_launch() == nullptr) return false;
  for (size_t i = 0; i < k->param_names.size(); ++i) {
    const int64_t* v = find_arg(args, k->param_names[i]);
    if (v == nullptr) return false;
    if (!value_fits(*v, k->param_kinds[i], k->param_div16[i])) return false;
  }
  for (size_t i = 0; i < k->const_names.size(); ++i) {
    const int64_t* v = find_arg(args, k->const_names[i]);
    if (v != nullptr && *v != k->const_values[i]) return false;
  }
  return true;
}

int64_t triton_kernel_constant(int64_t id, const char* name, int64_t fallback) {
  const TritonKernel* k = kernel_of(id);
  if (k == nullptr) return fallback;
  for (size_t i = 0; i < k->const_names.size(); ++i) {
    if (k->const_names[i] == name) return k->const_values[i];
  }
  return fallback;
}

cudaError_t launch_triton_kernel(int64_t id, const TritonArgs& args, unsigned grid, cudaStream_t stream) {
  const TritonKernel* k = kernel_of(id);
  const LaunchFn launch = driver_launch();
  if (k == nullptr || launch == nullptr) return cudaErrorInvalidValue;
  if (grid == 0) return cudaSuccess;
  // One 8-byte slot per parameter (an i32 reads the low half: little-endian), then Triton's two
  // scratch pointers (null: registered kernels need no scratch memory).
  std::vector<int64_t> values(k->param_names.size() + 2, 0);
  std::vector<void*> params(values.size());
  for (size_t i = 0; i < k->param_names.size(); ++i) {
    const int64_t* v = find_arg(args, k->param_names[i]);
    if (v == nullptr) return cudaErrorInvalidValue;
    if (k->param_kinds[i] == kTritonI32) {
      const int32_t v32 = static_cast<int32_t>(*v);
      std::memcpy(&values[i], &v32, sizeof(v32));
    } else {
      values[i] = *v;
    }
  }
  for (size_t i = 0; i < values.size(); ++i) params[i] = &values[i];
  const CUresult res = launch(k->function, grid, 1, 1, k->threads, 1, 1, k->shared_bytes,
                              reinterpret_cast<CUstream>(stream), params.data(), nullptr);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorLaunchFailure;
}

}  // namespace adaptmoe
