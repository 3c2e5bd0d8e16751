// One GEMM of dropless training in capacity slots, forward and backward as native calls
// (slotted_gemm.cpp; adaptmoe/ops/_triton_slotted.py's slotted_bmm runs the same steps from Python).
#pragma once
#include <torch/extension.h>

#include <vector>

namespace adaptmoe {

// c_SN[s] = a_SK[s] @ W_e for every slot row s (bf16), e its slot's owner, W_e = w_E[e]^T when
// transpose_w (w_E [E, N, KD]) else w_E[e] ([E, KD, N]): cuBLAS's batched GEMM over the E blocks of
// C slots (relu in its epilogue when relu, transpose_w only), then the overflow rows (rows_O[g],
// over_E per true expert: the slot layout of launch_overflow_layout) recomputed with their own
// expert's weights by the first of the registered row-kernel variants `fixup_ids` that fits.
// Returns {c_SN}, or nothing (and nothing enqueued) when no variant fits.
std::vector<at::Tensor> slotted_bmm_forward(const at::Tensor& a_SK, const at::Tensor& w_E, bool transpose_w, bool relu,
                                            const at::Tensor& rows_O, const at::Tensor& over_E,
                                            const std::vector<int64_t>& fixup_ids);

// The backward of the above for the gradient gc_SN: {ga_SK (when need_a), gw_E (when need_w)},
// undefined where not needed: batched GEMMs, the input gradient's overflow rows fixed up by a row
// kernel (dgrad_ids), each overflow row's weight-gradient product moved from its slot owner
// (hosted_E) to its own expert (over_E) by the move kernel (move_ids). Nothing (and nothing
// enqueued) when a needed kernel has no fitting variant.
std::vector<at::Tensor> slotted_bmm_backward(const at::Tensor& gc_SN, const at::Tensor& a_SK, const at::Tensor& w_E,
                                             bool transpose_w, const at::Tensor& rows_O, const at::Tensor& over_E,
                                             const at::Tensor& hosted_E, bool need_a, bool need_w,
                                             const std::vector<int64_t>& dgrad_ids,
                                             const std::vector<int64_t>& move_ids);

}  // namespace adaptmoe
