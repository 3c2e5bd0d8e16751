// Batched expert GEMM with the activation fused into cuBLASLt's epilogue:
//   h_eCH = act(x_eCD @ w_eHD^T + b_eH)
// The first GEMM of a capacity-padded 2-matrix FFN; without the fusion the activation is its own
// pass over e*C*H elements (read + write; 0.09 ms per fine-grained forward on an H100).
//
// cuBLASLt is column-major, so the row-major product is computed as its transpose:
//   h^T [H x C] = w [H x D] (stored row-major = column-major D x H, op T) * x^T [D x C]
// Descriptors, layouts and the heuristic's algorithm are built once per shape and cached (the
// heuristic call costs tens of microseconds of host time, the descriptors ~5).
#include "blaslt.h"

#include <ATen/cuda/CUDAContext.h>
#include <torch/version.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>

#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

namespace adaptmoe {
namespace {

constexpr size_t kWorkspaceBytes = 32u << 20;   // what cuBLAS asks for on Hopper

// torch >= 2.8 keeps one cuBLASLt workspace per handle and stream (stream-ordered, so any op on
// this stream may use it): no allocation per GEMM (~3.5 us of host time on the H100 machine).
// Older torch: a workspace tensor per call from the caching allocator.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
constexpr bool kTorchWorkspace = true;
size_t workspace_bytes() { return at::cuda::getCUDABlasLtWorkspaceSize(); }
#else
constexpr bool kTorchWorkspace = false;
size_t workspace_bytes() { return kWorkspaceBytes; }
#endif

std::string status_text(cublasStatus_t s) { return std::to_string(static_cast<int>(s)); }

void check(cublasStatus_t s, const char* what) {
  TORCH_CHECK(s == CUBLAS_STATUS_SUCCESS, std::string("bmm_nt_act: ") + what + " failed with cuBLAS status " +
                                              status_text(s));
}

cudaDataType_t cuda_type(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return CUDA_R_16BF;
    case at::kHalf: return CUDA_R_16F;
    case at::kFloat: return CUDA_R_32F;
    default: TORCH_CHECK(false, std::string("bmm_nt_act: dtype must be float32, float16 or bfloat16, got ") +
                                    c10::toString(t));
  }
  return CUDA_R_32F;
}

int alignment_of(const void* p) {
  auto v = reinterpret_cast<uintptr_t>(p);
  int a = 256;
  while (a > 1 && v % a) a /= 2;
  return a;
}

// RAII holders: descriptors are released on every path, errors included.
struct Desc {
  cublasLtMatmulDesc_t d = nullptr;
  ~Desc() { if (d) cublasLtMatmulDescDestroy(d); }
};
struct Layout {
  cublasLtMatrixLayout_t l = nullptr;
  ~Layout() { if (l) cublasLtMatrixLayoutDestroy(l); }
};
struct Pref {
  cublasLtMatmulPreference_t p = nullptr;
  ~Pref() { if (p) cublasLtMatmulPreferenceDestroy(p); }
};

void make_layout(Layout& out, cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld, int batch,
                 int64_t batch_stride) {
  check(cublasLtMatrixLayoutCreate(&out.l, type, rows, cols, ld), "layout create");
  check(cublasLtMatrixLayoutSetAttribute(out.l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch, sizeof(batch)),
        "layout batch count");
  check(cublasLtMatrixLayoutSetAttribute(out.l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &batch_stride,
                                         sizeof(batch_stride)),
        "layout batch stride");
}

// (device, dtype, epilogue, e, C, D, H, alignments of w, x, h, tf32, workspace bytes): the
// algorithm depends on the GPU and on the workspace it may use.
using PlanKey = std::tuple<int, int, int, int64_t, int64_t, int64_t, int64_t, int, int, int, bool, size_t>;

// Everything about one GEMM shape but its pointers: descriptors, layouts and the heuristic's
// algorithm, built once. Building them cost ~5 us of host time per call on the H100 machine
// (seven cuBLASLt create/set calls), the heuristic tens of microseconds.
struct Plan {
  Desc op;
  Layout w, x, h;
  cublasLtMatmulAlgo_t algo{};
};
// Never destroyed: no cuBLASLt calls from static destructors at process exit.
std::map<PlanKey, std::unique_ptr<Plan>>& plan_cache() {
  static auto* cache = new std::map<PlanKey, std::unique_ptr<Plan>>();
  return *cache;
}
std::mutex& plan_mutex() {
  static std::mutex m;
  return m;
}

// bias: the first call's bias pointer (null without bias); later calls set their own.
std::unique_ptr<Plan> make_plan(cublasLtHandle_t handle, cudaDataType_t type, cublasComputeType_t compute,
                                cublasLtEpilogue_t epilogue, const void* bias, int64_t e, int64_t C, int64_t D,
                                int64_t H, int align_w, int align_x, int align_h, size_t workspace) {
  auto plan = std::make_unique<Plan>();
  check(cublasLtMatmulDescCreate(&plan->op.d, compute, CUDA_R_32F), "matmul desc create");
  const cublasOperation_t trans_w = CUBLAS_OP_T, trans_x = CUBLAS_OP_N;
  check(cublasLtMatmulDescSetAttribute(plan->op.d, CUBLASLT_MATMUL_DESC_TRANSA, &trans_w, sizeof(trans_w)), "transa");
  check(cublasLtMatmulDescSetAttribute(plan->op.d, CUBLASLT_MATMUL_DESC_TRANSB, &trans_x, sizeof(trans_x)), "transb");
  check(cublasLtMatmulDescSetAttribute(plan->op.d, CUBLASLT_MATMUL_DESC_EPILOGUE, &epilogue, sizeof(epilogue)),
        "epilogue");
  if (bias != nullptr) {
    check(cublasLtMatmulDescSetAttribute(plan->op.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bias, sizeof(bias)), "bias");
    const int64_t bias_stride = H;
    check(cublasLtMatmulDescSetAttribute(plan->op.d, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, &bias_stride,
                                         sizeof(bias_stride)),
          "bias batch stride");
    check(cublasLtMatmulDescSetAttribute(plan->op.d, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, &type, sizeof(type)),
          "bias dtype");
  }
  const int batch = static_cast<int>(e);
  make_layout(plan->w, type, D, H, D, batch, H * D);   // column-major D x H per expert, op T -> H x D
  make_layout(plan->x, type, D, C, D, batch, C * D);   // column-major D x C (x^T)
  make_layout(plan->h, type, H, C, H, batch, C * H);   // column-major H x C (h^T)
  Pref pref;
  check(cublasLtMatmulPreferenceCreate(&pref.p), "preference create");
  size_t ws = workspace;
  check(cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)),
        "workspace preference");
  const uint32_t aw = align_w, ax = align_x, ah = align_h;
  cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &aw, sizeof(aw));
  cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &ax, sizeof(ax));
  cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &ah, sizeof(ah));
  cublasLtMatmulPreferenceSetAttribute(pref.p, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &ah, sizeof(ah));
  cublasLtMatmulHeuristicResult_t result{};
  int found_count = 0;
  check(cublasLtMatmulAlgoGetHeuristic(handle, plan->op.d, plan->w.l, plan->x.l, plan->h.l, plan->h.l, pref.p, 1,
                                       &result, &found_count),
        "heuristic");
  TORCH_CHECK(found_count > 0, "bmm_nt_act: cuBLASLt has no algorithm for this shape");
  plan->algo = result.algo;
  return plan;
}

}  // namespace

at::Tensor bmm_nt_act(const at::Tensor& x_eCD, const at::Tensor& w_eHD, const c10::optional<at::Tensor>& b_eH,
                      int64_t act, bool allow_tf32) {
  TORCH_CHECK(x_eCD.is_cuda() && w_eHD.is_cuda(), "bmm_nt_act: x and w must be CUDA tensors");
  TORCH_CHECK(x_eCD.dim() == 3 && w_eHD.dim() == 3, "bmm_nt_act: x must be [e, C, D] and w [e, H, D]");
  TORCH_CHECK(x_eCD.scalar_type() == w_eHD.scalar_type(), "bmm_nt_act: x and w must share a dtype");
  TORCH_CHECK(x_eCD.is_contiguous() && w_eHD.is_contiguous(), "bmm_nt_act: x and w must be contiguous");
  TORCH_CHECK(act == kActIdentity || act == kActRelu, "bmm_nt_act: act must be 0 (identity) or 1 (relu), got " +
                                                          std::to_string(act));
  const int64_t e = x_eCD.size(0), C = x_eCD.size(1), D = x_eCD.size(2), H = w_eHD.size(1);
  TORCH_CHECK(w_eHD.size(0) == e && w_eHD.size(2) == D,
              "bmm_nt_act: w must be [" + std::to_string(e) + ", H, " + std::to_string(D) + "]");
  const bool has_bias = b_eH.has_value() && b_eH->defined();
  if (has_bias) {
    TORCH_CHECK(b_eH->is_contiguous() && b_eH->scalar_type() == x_eCD.scalar_type() && b_eH->dim() == 2 &&
                    b_eH->size(0) == e && b_eH->size(1) == H,
                "bmm_nt_act: bias must be a contiguous [e, H] tensor of x's dtype");
  }
  c10::cuda::CUDAGuard guard(x_eCD.device());
  auto h_eCH = at::empty({e, C, H}, x_eCD.options());
  if (h_eCH.numel() == 0) return h_eCH;
  if (D == 0) {   // empty reduction: act(bias) or act(0)
    auto base = has_bias ? b_eH->unsqueeze(1).expand({e, C, H}) : at::zeros_like(h_eCH);
    return act == kActRelu ? at::relu(base).contiguous() : base.contiguous();
  }
  bmm_nt_act_into(x_eCD.scalar_type(), x_eCD.get_device(), x_eCD.data_ptr(), w_eHD.data_ptr(),
                  has_bias ? b_eH->data_ptr() : nullptr, h_eCH.data_ptr(), e, C, D, H, act, allow_tf32);
  return h_eCH;
}

void bmm_nt_act_into(at::ScalarType dtype, int device, const void* x, const void* w, const void* b, void* h,
                     int64_t e, int64_t C, int64_t D, int64_t H, int64_t act, bool allow_tf32) {
  TORCH_CHECK(e <= INT32_MAX, "bmm_nt_act: too many experts for one cuBLASLt call");
  const bool has_bias = b != nullptr;
  const cudaDataType_t type = cuda_type(dtype);
  const bool tf32 = type == CUDA_R_32F && allow_tf32;
  const cublasComputeType_t compute = type == CUDA_R_32F
                                          ? (tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F)
                                          : CUBLAS_COMPUTE_32F;
  const cublasLtEpilogue_t epilogue = act == kActRelu ? (has_bias ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU)
                                                      : (has_bias ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT);
  const size_t ws_bytes = workspace_bytes();
  at::Tensor ws_tensor;   // holds the per-call workspace on older torch
  void* ws_ptr = nullptr;
  if constexpr (kTorchWorkspace) {
    ws_ptr = at::cuda::getCUDABlasLtWorkspace();
  } else {
    ws_tensor = at::empty({static_cast<int64_t>(ws_bytes)}, at::TensorOptions().device(at::kCUDA, device).dtype(at::kByte));
    ws_ptr = ws_tensor.data_ptr();
  }
  const int align_w = alignment_of(w), align_x = alignment_of(x), align_h = alignment_of(h);
  const PlanKey key{device, static_cast<int>(type), static_cast<int>(epilogue), e, C, D, H, align_w, align_x,
                    align_h, tf32, ws_bytes};
  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  const float one = 1.0f, zero = 0.0f;
  // Held until the GEMM is enqueued: the bias pointer lives in the shared descriptor.
  std::lock_guard<std::mutex> lock(plan_mutex());
  auto found = plan_cache().find(key);
  if (found == plan_cache().end()) {
    found = plan_cache().emplace(key, make_plan(handle, type, compute, epilogue, b, e, C, D, H, align_w, align_x,
                                                align_h, ws_bytes)).first;
  }
  Plan& plan = *found->second;
  if (has_bias) {
    check(cublasLtMatmulDescSetAttribute(plan.op.d, CUBLASLT_MATMUL_DESC_BIAS_POINTER, &b, sizeof(b)), "bias");
  }
  check(cublasLtMatmul(handle, plan.op.d, &one, w, plan.w.l, x, plan.x.l, &zero, h, plan.h.l, h, plan.h.l, &plan.algo,
                       ws_ptr, ws_bytes, at::cuda::getCurrentCUDAStream()),
        "matmul");
}

}  // namespace adaptmoe
