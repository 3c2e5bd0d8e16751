// cuBLASLt-backed batched GEMM with a fused epilogue (blaslt.cpp).
#pragma once

#include <torch/extension.h>

#include "moe_kernels.h"

namespace adaptmoe {

// h_eCH = act(x_eCD @ w_eHD^T + b_eH): x [e, C, D], w [e, H, D] contiguous, one dtype
// (float32, float16, bfloat16); b optional [e, H] of that dtype; act kActIdentity or kActRelu
// (the Activation codes of moe_kernels.h); allow_tf32 lets float32 use TF32 tensor cores
// (torch.backends.cuda.matmul.allow_tf32). Runs on the current stream.
at::Tensor bmm_nt_act(const at::Tensor& x_eCD, const at::Tensor& w_eHD, const c10::optional<at::Tensor>& b_eH,
                      int64_t act, bool allow_tf32);

// The same GEMM on raw pointers into h (e*C*H elements), no checks, D > 0: for callers that have
// checked their operands and would otherwise make views just to pass them (each view is a
// dispatcher call, ~2-3 us of host time in front of the GEMM). b may be null; the current device
// must be `device`; runs on the current stream.
void bmm_nt_act_into(at::ScalarType dtype, int device, const void* x, const void* w, const void* b, void* h,
                     int64_t e, int64_t C, int64_t D, int64_t H, int64_t act, bool allow_tf32);

}  // namespace adaptmoe
