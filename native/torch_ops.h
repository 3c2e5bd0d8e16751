// Torch-facing helpers shared by bindings.cpp and layer_forward.cpp: error text, dtype codes,
// argument checks, and the tensor-level ops both call (defined in bindings.cpp, which also
// exposes them to Python).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "moe_kernels.h"

namespace adaptmoe::torch_ops {

using at::Tensor;

// Error text built here, not by TORCH_CHECK's stream formatting: with the device machine's torch
// build, a TORCH_CHECK whose message streams an integer crashed the process (segfault) instead
// of raising; strings, dtypes and devices formatted first are safe.
inline std::string piece(const char* v) { return v; }
inline std::string piece(const std::string& v) { return v; }
inline std::string piece(at::ScalarType v) { return c10::toString(v); }
inline std::string piece(const c10::Device& v) { return v.str(); }
inline std::string piece(at::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + std::to_string(v[i]);
  return s + "]";
}
template <typename T, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
std::string piece(T v) { return std::to_string(v); }
template <typename... Args>
std::string text(const Args&... args) { return (std::string() + ... + piece(args)); }

inline adaptmoe::DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return adaptmoe::kFloat32;
    case at::kHalf: return adaptmoe::kFloat16;
    case at::kBFloat16: return adaptmoe::kBFloat16;
    default: TORCH_CHECK(false, text("adaptmoe native ops take float32, float16 or bfloat16, got ", t.scalar_type()));
  }
  return adaptmoe::kFloat32;
}

inline void check_cuda(const Tensor& t, const char* name, const Tensor& like) {
  TORCH_CHECK(t.is_cuda(), text("adaptmoe: ", name, " must be a CUDA tensor"));
  TORCH_CHECK(t.device() == like.device(), text("adaptmoe: ", name, " is on ", t.device(), ", expected ", like.device()));
}

// The dtype code of t, a 2-D CUDA tensor of a float type the kernels take.
inline adaptmoe::DType check_rows(const Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2, text("adaptmoe: ", name, " must be a 2-D CUDA tensor"));
  return dtype_of(t);
}

// Expert choices: int64 [T, k >= 1] on like's device (T = rows unless rows < 0), contiguous.
inline Tensor checked_indices(const Tensor& indices_TK, const Tensor& like, int64_t rows = -1) {
  check_cuda(indices_TK, "indices_TK", like);
  TORCH_CHECK(indices_TK.dim() == 2 && indices_TK.scalar_type() == at::kLong && indices_TK.size(1) >= 1 &&
                  (rows < 0 || indices_TK.size(0) == rows),
              text("adaptmoe: indices_TK must be int64 (T, k >= 1)", rows < 0 ? "" : text(" with T=", rows)));
  return indices_TK.contiguous();
}

// The device address of `host` for a kernel that writes a count there, read by the host without a
// copy or an event: one int64 of pinned, mapped host memory (cudaHostAlloc under unified
// addressing); null for any other tensor.
inline int64_t* host_count_pointer(const Tensor& host) {
  if (host.is_cuda() || !host.is_pinned() || host.scalar_type() != at::kLong || host.numel() != 1) return nullptr;
  void* device_ptr = nullptr;
  if (cudaHostGetDevicePointer(&device_ptr, host.data_ptr(), 0) != cudaSuccess) {
    (void)cudaGetLastError();   // not a sticky error: clear it
    return nullptr;
  }
  return static_cast<int64_t*>(device_ptr);
}

// host_count_pointer, or an error naming the argument.
inline int64_t* checked_host_count(const Tensor& host, const char* name) {
  int64_t* device_ptr = host_count_pointer(host);
  TORCH_CHECK(device_ptr != nullptr,
              text("adaptmoe: ", name, " must be one int64 of pinned, mapped host memory (see host_writable)"));
  return device_ptr;
}

// num_experts in [1, max_experts] for the kernels of `what`.
inline void check_experts(int64_t num_experts, int64_t max_experts, const char* what) {
  TORCH_CHECK(num_experts >= 1 && num_experts <= max_experts,
              text("adaptmoe: ", what, " takes 1..", max_experts, " experts, got ", num_experts));
}

// Tensors over buf's storage from byte_offset, built directly: each narrow, view or transpose is a
// dispatcher call (~2-3 us of host time on the H100 machines), and a native layer call made ~20 of
// them. Each has its own version counter: for tensors that never carry autograd. The caller keeps
// them inside buf's storage.
inline Tensor storage_alias(const Tensor& buf, at::ScalarType dtype, int64_t byte_offset) {
  Tensor t = at::detail::make_tensor<c10::TensorImpl>(c10::Storage(buf.storage()), buf.key_set(),
                                                      c10::scalarTypeToTypeMeta(dtype));
  t.unsafeGetTensorImpl()->set_storage_offset((buf.storage_offset() * buf.element_size() + byte_offset) /
                                              static_cast<int64_t>(c10::elementSize(dtype)));
  return t;
}

// With these sizes and element strides.
inline Tensor alias_strided(const Tensor& buf, at::ScalarType dtype, int64_t byte_offset, at::IntArrayRef sizes,
                            at::IntArrayRef strides) {
  Tensor t = storage_alias(buf, dtype, byte_offset);
  t.unsafeGetTensorImpl()->set_sizes_and_strides(sizes, strides);
  return t;
}

// Contiguous, of these sizes.
inline Tensor alias(const Tensor& buf, at::ScalarType dtype, int64_t byte_offset, at::IntArrayRef sizes) {
  Tensor t = storage_alias(buf, dtype, byte_offset);
  t.unsafeGetTensorImpl()->set_sizes_contiguous(sizes);
  return t;
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, text("adaptmoe native ", what, " failed: ", cudaGetErrorString(err)));
}

// act(g) * u elementwise (no autograd); act: Activation code.
Tensor act_mul(const Tensor& g, const Tensor& u, int64_t act);

// GShard loss (0-dim float32, no autograd) of scores_TE and the first choices indices_TK[:, 0].
Tensor gshard_loss(const Tensor& scores_TE, const Tensor& indices_TK, bool normalize_rows);

}  // namespace adaptmoe::torch_ops
