// One GEMM of dropless training in capacity slots (adaptmoe/ops/_triton_slotted.py's slotted_bmm),
// forward and backward each as one native call: cuBLAS's batched GEMMs over the slots, then the
// registered Triton kernels that fix up the overflow rows (triton_rows.h). From Python the same
// steps cost a launch through Triton's or the registered launcher per fix-up plus the Python
// around it; on the H100 machine a fine-grained step's host time was ~0.35 ms longer than cf=1's
// (scripts/train_host_split.py), time its GPU waited for.
#include "slotted_gemm.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <array>

#include "blaslt.h"
#include "torch_ops.h"
#include "triton_rows.h"

namespace adaptmoe {
namespace {

using at::Tensor;
using torch_ops::text;

// a_SK [S, KD] (S = E*C slot rows), w_E [E, N, KD] (transpose_w) or [E, KD, N], bf16, contiguous;
// rows_O and over_E int64 of the slot layout. Returns (E, C, KD, N).
std::array<int64_t, 4> checked_slotted(const Tensor& a_SK, const Tensor& w_E, bool transpose_w, const Tensor& rows_O,
                                       const Tensor& over_E) {
  TORCH_CHECK(a_SK.is_cuda() && a_SK.dim() == 2 && a_SK.is_contiguous() && a_SK.scalar_type() == at::kBFloat16,
              "adaptmoe: a_SK must be a contiguous 2-D bfloat16 CUDA tensor");
  torch_ops::check_cuda(w_E, "w_E", a_SK);
  TORCH_CHECK(w_E.dim() == 3 && w_E.is_contiguous() && w_E.scalar_type() == at::kBFloat16,
              "adaptmoe: w_E must be a contiguous bfloat16 (E, N, KD) or (E, KD, N) tensor");
  const int64_t E = w_E.size(0), KD = transpose_w ? w_E.size(2) : w_E.size(1), N = transpose_w ? w_E.size(1) : w_E.size(2);
  TORCH_CHECK(a_SK.size(1) == KD && a_SK.size(0) % E == 0,
              text("adaptmoe: a_SK must be (E*C, ", KD, ") for the weights' ", E, " experts"));
  for (const Tensor* t : {&rows_O, &over_E}) {
    torch_ops::check_cuda(*t, "slot layout", a_SK);
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->is_contiguous(),
                "adaptmoe: rows_O and over_E must be contiguous 1-D int64 tensors");
  }
  TORCH_CHECK(over_E.size(0) == E, "adaptmoe: over_E must hold one count per expert");
  return {E, a_SK.size(0) / E, KD, N};
}

// c_ECN = a_ECK @ W_e per expert into c_SN: W_e = w_E[e]^T when transpose_w, else w_E[e].
void batched_into(const Tensor& c_SN, const Tensor& a_SK, const Tensor& w_E, bool transpose_w, int64_t E, int64_t C) {
  Tensor c = c_SN.view({E, C, c_SN.size(1)});
  at::bmm_out(c, a_SK.view({E, C, a_SK.size(1)}), transpose_w ? w_E.transpose(1, 2) : w_E);
}

// triton_rows.h's slot_fixup of these tensors (no bias).
RowsGemm slot_fixup_of(const Tensor& a_SK, const Tensor& w_E, const Tensor& c_SN, bool transpose_w, const Tensor& rows_O,
                       const Tensor& over_E, int64_t epilogue) {
  return slot_fixup(a_SK.data_ptr(), w_E.data_ptr(), nullptr, c_SN.data_ptr(), rows_O.data_ptr<int64_t>(),
                    over_E.data_ptr<int64_t>(), rows_O.numel(), w_E.size(0), a_SK.size(1), c_SN.size(1), transpose_w,
                    epilogue);
}

}  // namespace

std::vector<at::Tensor> slotted_bmm_forward(const at::Tensor& a_SK, const at::Tensor& w_E, bool transpose_w, bool relu,
                                            const at::Tensor& rows_O, const at::Tensor& over_E,
                                            const std::vector<int64_t>& fixup_ids) {
  const auto [E, C, KD, N] = checked_slotted(a_SK, w_E, transpose_w, rows_O, over_E);
  TORCH_CHECK(!relu || transpose_w, "adaptmoe: the relu epilogue takes w_E as (E, N, KD)");
  const c10::cuda::CUDAGuard guard(a_SK.device());
  const at::NoGradGuard no_grad;
  const Tensor c_SN = at::empty({E * C, N}, a_SK.options());
  const RowsLaunch fixup = first_fitting(fixup_ids, slot_fixup_of(a_SK, w_E, c_SN, transpose_w, rows_O, over_E,
                                                                  relu ? kEpilogueRelu : kEpilogueNone));
  if (fixup.id < 0) return {};   // nothing enqueued: the caller runs the Python steps
  if (relu) {
    bmm_nt_act_into(at::kBFloat16, a_SK.get_device(), a_SK.data_ptr(), w_E.data_ptr(), nullptr, c_SN.data_ptr(), E, C,
                    KD, N, kActRelu, /*allow_tf32=*/false);
  } else {
    batched_into(c_SN, a_SK, w_E, transpose_w, E, C);
  }
  fixup.enqueue("slot fix-up (Triton)");
  return {c_SN};
}

std::vector<at::Tensor> slotted_bmm_backward(const at::Tensor& gc_SN, const at::Tensor& a_SK, const at::Tensor& w_E,
                                             bool transpose_w, const at::Tensor& rows_O, const at::Tensor& over_E,
                                             const at::Tensor& hosted_E, bool need_a, bool need_w,
                                             const std::vector<int64_t>& dgrad_ids,
                                             const std::vector<int64_t>& move_ids) {
  const auto [E, C, KD, N] = checked_slotted(a_SK, w_E, transpose_w, rows_O, over_E);
  TORCH_CHECK(gc_SN.is_contiguous() && gc_SN.dim() == 2 && gc_SN.size(0) == E * C && gc_SN.size(1) == N &&
                  gc_SN.scalar_type() == at::kBFloat16,
              "adaptmoe: gc_SN must be a contiguous bfloat16 (S, N) tensor");
  TORCH_CHECK(hosted_E.dim() == 1 && hosted_E.size(0) == E && hosted_E.scalar_type() == at::kLong &&
                  hosted_E.is_contiguous(),
              "adaptmoe: hosted_E must hold one int64 count per expert");
  const c10::cuda::CUDAGuard guard(a_SK.device());
  const at::NoGradGuard no_grad;
  // ga = gc @ W_e^T per slot block, overflow rows with their own expert's; gw[e] = p^T q over the
  // slots of e, then each overflow row's product moved from its slot owner to its own expert (an
  // expert with overflow has no free slots, so none both loses and gains).
  const Tensor& p_SP = transpose_w ? gc_SN : a_SK;
  const Tensor& q_SQ = transpose_w ? a_SK : gc_SN;
  const Tensor ga_SK = need_a ? at::empty({E * C, KD}, a_SK.options()) : Tensor();
  const Tensor gw_E = need_w ? at::empty(w_E.sizes(), w_E.options()) : Tensor();
  RowsLaunch dgrad, move;
  if (need_a) dgrad = first_fitting(dgrad_ids, slot_fixup_of(gc_SN, w_E, ga_SK, !transpose_w, rows_O, over_E, kEpilogueNone));
  if (need_w) {
    move = first_fitting(move_ids, MoveGemm{p_SP.data_ptr(), q_SQ.data_ptr(), gw_E.data_ptr(), hosted_E.data_ptr(),
                                            over_E.data_ptr(), rows_O.data_ptr(), E, p_SP.size(1), q_SQ.size(1)});
  }
  if ((need_a && dgrad.id < 0) || (need_w && move.id < 0)) return {};   // nothing enqueued
  if (need_a) {
    batched_into(ga_SK, gc_SN, w_E, !transpose_w, E, C);
    dgrad.enqueue("slot fix-up of the input gradient (Triton)");
  }
  if (need_w) {
    Tensor gw = gw_E;
    at::bmm_out(gw, p_SP.view({E, C, p_SP.size(1)}).transpose(1, 2), q_SQ.view({E, C, q_SQ.size(1)}));
    move.enqueue("weight-gradient move of the overflow rows (Triton)");
  }
  return {ga_SK, gw_E};
}

}  // namespace adaptmoe
