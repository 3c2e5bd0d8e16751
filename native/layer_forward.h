// One native call for the no-grad forward of a single-process MoE layer (layer_forward.cpp).
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace adaptmoe {

// Enqueues, on the current stream: logits_TE = x_TD @ wg_ED^T (float32 operands when gate_fp32,
// else x cast to wg's dtype), scores + top-k + slot assignment, dispatch (rows pre-scaled by the
// weights unless postscore), the experts' FFN, combine (post-scaled when postscore).
// capacity: slots per expert, or -1 for dropless (T*k routed rows). grouped: dropless rows run
// through torch's grouped GEMM (bf16, sm90; the caller checks), else rows are a padded
// [E, R/E, D] batch. act: Activation code of moe_kernels.h; relu_epilogue: relu in the first
// GEMM's cuBLASLt epilogue (padded layout, no w3). Expert weights: w1 [E, H, D], w2 [E, H, O],
// w3 [E, H, D], b1 [E, H], b2 [E, O], x's dtype. Every op is the one the Python path runs, in the
// same order, so results match it bit for bit (the loss: see launch_gshard_loss), except with
// dense: every token goes to every expert (k == E, post-scored, capacity < 0 or >= T, T > 0), the
// first GEMM reads x_TD for all experts at once (before the gate) and the second combines from a
// token-major [E, T, O] buffer: no dispatch; the same products, rounded by GEMMs of other shapes.
// Returns (y_TO, logits_TE, indices_TK, weights_TK, scores_TE, locations_TK, counts_E, slots_TK,
// gshard loss (0-dim float32; None unless want_gshard_loss)).
std::vector<at::Tensor> moe_forward_nograd(const at::Tensor& x_TD, const at::Tensor& wg_ED, bool gate_fp32, int64_t k,
                                           int64_t score_fn, bool normalize, int64_t capacity, bool postscore,
                                           bool grouped, const at::Tensor& w1_EHD, const at::Tensor& w2_EHO,
                                           const std::optional<at::Tensor>& w3_EHD,
                                           const std::optional<at::Tensor>& b1_EH,
                                           const std::optional<at::Tensor>& b2_EO, int64_t act, bool relu_epilogue,
                                           bool allow_tf32, bool want_gshard_loss, bool dense);

// The routing part of the above (gathered_forward.cpp): logits_TE, then (indices_TK, weights_TK,
// scores_TE, locations_TK, counts_E, slots_TK) and inv_R (int32: the choice t*K + k that feeds each
// row), for an expert GEMM that gathers its rows itself. capacity < 0 (dropless): the T*K grouped
// rows; else the E * capacity rows of the padded layout, rows no choice feeds reading choice 0.
// slot_capacity >= 0 (dropless only): the routing laid out in that many slots per expert
// (launch_overflow_layout; E * slot_capacity >= T*K), inv_R then over the slots, followed by the
// layout's slots_TK, rows_O, choice_O, over_E and capacity_E (int64).
std::vector<at::Tensor> moe_route_nograd(const at::Tensor& x_TD, const at::Tensor& wg_ED, bool gate_fp32, int64_t k,
                                         int64_t score_fn, bool normalize, int64_t capacity, int64_t slot_capacity);

// A bf16 call of relu experts without w3 or b2, post-scored, as moe_forward_nograd returns it, with
// the first GEMM gathering its rows from x_TD (the Triton kernel of ops/_triton_gemm.py's
// gathered_fc1_relu, launched from here: the first of the registered `kernel_ids` whose
// specialization this call's arguments satisfy, see triton_launch.h). Three layouts:
// - dropless (capacity < 0, slot_capacity < 0): the T*K grouped rows, the second GEMM through
//   torch's grouped GEMM;
// - capacity >= 0: the E * capacity rows of the padded layout (every expert `capacity` rows, the
//   unfed ones computed from token 0 and never read), the second GEMM a batched one;
// - dropless in slots (capacity < 0, slot_capacity >= 0; see moe_route_nograd): both GEMMs over
//   the E * slot_capacity slots as in the padded layout, then the rows that overflowed into other
//   experts' slots recomputed with their own expert's weights by the row kernel (fc1_fixup_ids:
//   rows gathered from the tokens, scattered to their slots; fc2_fixup_ids: gathered from and
//   scattered to their slots), which finds no rows on balanced routing. The routing returned is
//   the dropless one (its slots the grouped rows'), as moe_route_nograd's.
// share_host (slotted calls; one pinned int64, see host_writable in bindings.cpp): gets the fix-up
// rows this call's layout costs per 1024 routed rows (launch_overflow_fixup_share), for a host that
// decides the next call's layout from it. Empty, with nothing enqueued, when a kernel is missing
// (or there are no rows).
std::vector<at::Tensor> moe_forward_nograd_gathered(const at::Tensor& x_TD, const at::Tensor& wg_ED, bool gate_fp32,
                                                    int64_t k, int64_t score_fn, bool normalize,
                                                    const at::Tensor& w1_EHD, const at::Tensor& w2_EHO,
                                                    const std::optional<at::Tensor>& b1_EH,
                                                    const std::vector<int64_t>& kernel_ids, bool want_gshard_loss,
                                                    int64_t capacity, int64_t slot_capacity,
                                                    const std::vector<int64_t>& fc1_fixup_ids,
                                                    const std::vector<int64_t>& fc2_fixup_ids,
                                                    const std::optional<at::Tensor>& share_host);

// A dropless bf16 call of relu experts without w3 or b2 in cf=1's capacity slots, as
// moe_forward_nograd returns it: the tokens dispatched into E * slot_capacity slots (the layout of
// moe_route_nograd; pre-scaled unless postscore), both GEMMs over every expert's slots as cuBLAS
// batched GEMMs (relu and b1 in the first one's epilogue), then the rows that overflowed into other
// experts' slots recomputed with their own expert's weights by the row kernel (fc1_fixup_ids,
// fc2_fixup_ids: both gathered from and scattered to their slots), combine from the slots. The
// routing returned is the dropless one (its slots the grouped rows'); share_host as for
// moe_forward_nograd_gathered. Empty, with nothing enqueued, when a fix-up kernel is missing (or
// there are no rows).
std::vector<at::Tensor> moe_forward_nograd_slotted(const at::Tensor& x_TD, const at::Tensor& wg_ED, bool gate_fp32,
                                                   int64_t k, int64_t score_fn, bool normalize, bool postscore,
                                                   const at::Tensor& w1_EHD, const at::Tensor& w2_EHO,
                                                   const std::optional<at::Tensor>& b1_EH, int64_t slot_capacity,
                                                   bool want_gshard_loss, const std::vector<int64_t>& fc1_fixup_ids,
                                                   const std::vector<int64_t>& fc2_fixup_ids,
                                                   const std::optional<at::Tensor>& share_host);

}  // namespace adaptmoe
