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

}  // namespace adaptmoe
