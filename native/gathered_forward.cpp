// The no-grad forwards that launch the Triton row kernel of adaptmoe/ops/_triton_gemm.py from C++
// (through triton_launch.h): first GEMMs that gather their rows from the tokens, and dropless
// calls in cf=1's capacity slots, whose overflow rows the row kernel recomputes; and the routing
// call that Python's fallback of them starts from (layer_forward.h).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <climits>

#include "blaslt.h"
#include "forward_parts.h"
#include "layer_forward.h"
#include "moe_kernels.h"
#include "torch_ops.h"
#include "triton_launch.h"
#include "triton_rows.h"

namespace adaptmoe {
namespace {

using namespace forward_parts;
using torch_ops::text;

// Rows of a gathering first GEMM: T*k (dropless, grouped) or E * capacity (padded, or slots).
int64_t gathered_rows(int64_t T, int64_t E, int64_t k, int64_t capacity) { return capacity < 0 ? T * k : E * capacity; }

// inv_R[r] = the choice feeding row r (launch_inverse_slots); the padded layout's unfed rows read
// choice 0 (their outputs are never gathered; an unset index would read out of bounds). rows_E
// (may be undefined): every expert's rows, the capacity, written by the same launch.
void launch_gathered_inverse(const Routed& r, int64_t capacity, const Tensor& inv_R, const Tensor& rows_E = Tensor()) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t rows = inv_R.numel();
  if (capacity >= 0 && rows > 0) {
    torch_ops::check_launch(cudaMemsetAsync(inv_R.data_ptr<int>(), 0, sizeof(int) * rows, stream), "inverse slots");
  }
  torch_ops::check_launch(launch_inverse_slots(r.slots(), r.T * r.k, rows, inv_R.data_ptr<int>(), stream,
                                               rows_E.defined() ? rows_E.data_ptr<int64_t>() : nullptr, r.E, capacity),
                          "inverse slots");
}

// A dropless routing laid out in C capacity slots per expert (launch_overflow_layout), in one
// buffer: int64 slots_TK, rows_O, choice_O (n = T*K each), over_E, capacity_E, then the int32
// inverse inv_S (E*C). Every part starts 16-byte aligned: the Triton kernels that read them were
// specialised for aligned pointers when Python launched them on the same layout.
struct SlotLayout {
  int64_t T = 0, K = 0, E = 0, C = 0;
  Tensor buf;
  static int64_t aligned(int64_t bytes) { return (bytes + 15) / 16 * 16; }
  int64_t n() const { return T * K; }
  int64_t offset(int part) const {   // parts 0-2: per choice, 3-4: per expert, 5: per slot
    return part <= 3 ? part * aligned(n() * 8) : 3 * aligned(n() * 8) + (part - 3) * aligned(E * 8);
  }
  int64_t* ints(int part) const { return reinterpret_cast<int64_t*>(static_cast<char*>(buf.data_ptr()) + offset(part)); }
  int64_t* slots() const { return ints(0); }
  int64_t* rows_O() const { return ints(1); }
  int64_t* choice_O() const { return ints(2); }
  int64_t* over_E() const { return ints(3); }
  int64_t* capacity_E() const { return ints(4); }
  int* inv_S() const { return reinterpret_cast<int*>(ints(5)); }
  // (inv_S, slots_TK, rows_O, choice_O, over_E, capacity_E)
  std::vector<Tensor> views() const {
    return {alias(buf, at::kInt, offset(5), {E * C}), alias(buf, at::kLong, 0, {T, K}),
            alias(buf, at::kLong, offset(1), {n()}), alias(buf, at::kLong, offset(2), {n()}),
            alias(buf, at::kLong, offset(3), {E}), alias(buf, at::kLong, offset(4), {E})};
  }
};

SlotLayout alloc_slot_layout(const Routed& r, int64_t C, const at::TensorOptions& options) {
  TORCH_CHECK(C >= 0 && r.E * C >= r.T * r.k && r.E * C < INT32_MAX,
              text("adaptmoe: slot_capacity must give E * slot_capacity >= T*k slots (fewer than 2^31), got ", C,
                   " for ", r.E, " experts and ", r.T * r.k, " rows"));
  SlotLayout l;
  l.T = r.T, l.K = r.k, l.E = r.E, l.C = C;
  l.buf = at::empty({l.offset(5) + 4 * r.E * C}, options.dtype(at::kByte));
  return l;
}

// The layout of r's dropless routing (r.locations, r.counts), slots no choice feeds reading choice 0.
void launch_slot_layout(const Routed& r, const SlotLayout& l) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  if (l.E * l.C > 0) {
    torch_ops::check_launch(cudaMemsetAsync(l.inv_S(), 0, sizeof(int) * l.E * l.C, stream), "slot layout");
  }
  torch_ops::check_launch(launch_overflow_layout(r.indices(), r.locations(), r.counts(), r.T, static_cast<int>(r.E),
                                                 static_cast<int>(r.k), l.C, l.slots(), l.rows_O(), l.choice_O(),
                                                 l.over_E(), nullptr, nullptr, nullptr, l.capacity_E(), l.inv_S(), stream),
                          "slot layout");
}

}  // namespace

std::vector<at::Tensor> moe_route_nograd(const at::Tensor& x_TD, const at::Tensor& wg_ED, bool gate_fp32, int64_t k,
                                         int64_t score_fn, bool normalize, int64_t capacity, int64_t slot_capacity) {
  check_gate_inputs(x_TD, wg_ED);
  TORCH_CHECK(slot_capacity < 0 || capacity < 0, "adaptmoe: a slot layout (slot_capacity >= 0) needs capacity -1");
  const c10::cuda::CUDAGuard guard(x_TD.device());
  const at::NoGradGuard no_grad;
  const Routed r = alloc_routed_for(x_TD, wg_ED, gate_fp32, k);
  const Tensor logits_TE = gate_and_route(r, x_TD, wg_ED, gate_fp32, score_fn, normalize, capacity);
  std::vector<Tensor> out{logits_TE};
  for (Tensor& t : r.views()) out.push_back(std::move(t));
  if (slot_capacity >= 0) {
    const SlotLayout l = alloc_slot_layout(r, slot_capacity, x_TD.options());
    launch_slot_layout(r, l);
    for (Tensor& t : l.views()) out.push_back(std::move(t));
    return out;
  }
  Tensor inv_R = at::empty({gathered_rows(r.T, r.E, r.k, capacity)}, x_TD.options().dtype(at::kInt));
  launch_gathered_inverse(r, capacity, inv_R);
  out.push_back(inv_R);
  return out;
}

namespace {

// The device pointer of a slotted call's pinned count (torch_ops::checked_host_count).
int64_t* checked_share(const Tensor& share_host, bool slotted) {
  TORCH_CHECK(slotted, "adaptmoe: share_host is for a slotted call (slot_capacity >= 0)");
  return torch_ops::checked_host_count(share_host, "share_host");
}

// The fix-up rows this call's slot layout costs per 1024 routed rows, into *share when given
// (rounded to the row tile of the fix-up kernel that will run).
void launch_share(const Routed& r, int64_t slot_capacity, const RowsLaunch& fixup, int64_t* share) {
  if (share == nullptr) return;
  torch_ops::check_launch(launch_overflow_fixup_share(r.counts(), static_cast<int>(r.E), slot_capacity,
                                                      triton_kernel_constant(fixup.id, "BM", 128), r.T * r.k, share,
                                                      c10::cuda::getCurrentCUDAStream()),
                          "fix-up share");
}

// The Triton launches of one gathered forward: the first GEMM, and with a slot layout the two
// overflow fix-ups (each GEMM recomputed for the rows that sit in other experts' slots).
struct GatheredLaunches {
  RowsLaunch fc1, fc1_fixup, fc2_fixup;
};

}  // namespace

std::vector<at::Tensor> moe_forward_nograd_gathered(const at::Tensor& x_TD, const at::Tensor& wg_ED, bool gate_fp32,
                                                    int64_t k, int64_t score_fn, bool normalize,
                                                    const at::Tensor& w1_EHD, const at::Tensor& w2_EHO,
                                                    const std::optional<at::Tensor>& b1_EH,
                                                    const std::vector<int64_t>& kernel_ids, bool want_gshard_loss,
                                                    int64_t capacity, int64_t slot_capacity,
                                                    const std::vector<int64_t>& fc1_fixup_ids,
                                                    const std::vector<int64_t>& fc2_fixup_ids,
                                                    const std::optional<at::Tensor>& share_host) {
  const ExpertWeights w{w1_EHD, w2_EHO, Tensor(), value_or_undefined(b1_EH), Tensor()};
  const bool slotted = slot_capacity >= 0;
  int64_t* share = share_host.has_value() ? checked_share(*share_host, slotted) : nullptr;
  TORCH_CHECK(!slotted || capacity < 0, "adaptmoe: a slot layout (slot_capacity >= 0) needs capacity -1");
  check_inputs(x_TD, wg_ED, k, capacity, /*grouped=*/capacity < 0 && !slotted, /*dense=*/false, /*postscore=*/true, w,
               false);
  TORCH_CHECK(x_TD.scalar_type() == at::kBFloat16, "adaptmoe: the gathered first GEMM takes bfloat16 tokens");
  const c10::cuda::CUDAGuard guard(x_TD.device());
  const at::NoGradGuard no_grad;
  const Tensor x = x_TD.contiguous();
  const int64_t T = x.size(0), E = wg_ED.size(0), D = x.size(1), H = w1_EHD.size(1), O = w2_EHO.size(2);
  const int64_t padded = slotted ? slot_capacity : capacity;   // rows per expert of the first GEMM, -1: grouped
  const int64_t R = gathered_rows(T, E, k, padded);
  if (T * k == 0 || R == 0) return {};
  // Every buffer first, then the kernels whose specializations fit their addresses; one missing:
  // nothing was enqueued, the caller launches through Triton.
  Routed r = alloc_routed_for(x, wg_ED, gate_fp32, k);
  const SlotLayout l = slotted ? alloc_slot_layout(r, slot_capacity, x.options()) : SlotLayout();
  // The padded layout's rows per expert (the capacity for every expert; grouped: the counts) and
  // the gathered rows' inverse in one allocation (each costs host time in front of the first GEMM).
  const int64_t rows_bytes = capacity < 0 ? 0 : (E * 8 + 15) / 16 * 16;
  const Tensor inverse_buf = slotted ? Tensor() : at::empty({rows_bytes + R * 4}, x.options().dtype(at::kByte));
  const Tensor inv_R = slotted ? Tensor() : alias(inverse_buf, at::kInt, rows_bytes, {R});
  const Tensor rows_E = rows_bytes == 0 ? Tensor() : alias(inverse_buf, at::kLong, 0, {E});
  const int64_t* rows_per_expert = slotted ? l.capacity_E() : capacity < 0 ? r.counts() : rows_E.data_ptr<int64_t>();
  Tensor h_RH = at::empty({R, H}, x.options());
  Tensor y_ECO = slotted ? at::empty({E, slot_capacity, O}, x.options()) : Tensor();
  const void* b1 = w.b1.defined() ? w.b1.data_ptr() : nullptr;
  GatheredLaunches launches;
  launches.fc1 = first_fitting(kernel_ids, {x.data_ptr(), slotted ? static_cast<const void*>(l.inv_S()) : inv_R.data_ptr(),
                                            nullptr, w.w1.data_ptr(), b1, h_RH.data_ptr(), rows_per_expert, E, k, D, H,
                                            R, true, kScatterNone, kEpilogueRelu});
  if (launches.fc1.id < 0) return {};
  if (slotted) {
    launches.fc1_fixup = first_fitting(fc1_fixup_ids, {x.data_ptr(), l.choice_O(), l.rows_O(), w.w1.data_ptr(), b1,
                                                       h_RH.data_ptr(), l.over_E(), E, k, D, H, T * k, true,
                                                       kScatterIndexed, kEpilogueRelu});
    launches.fc2_fixup = first_fitting(fc2_fixup_ids, slot_fixup(h_RH.data_ptr(), w.w2.data_ptr(), nullptr,
                                                                 y_ECO.data_ptr(), l.rows_O(), l.over_E(), T * k, E, H,
                                                                 O, false, kEpilogueNone));
    if (launches.fc1_fixup.id < 0 || launches.fc2_fixup.id < 0) return {};
  }
  const Tensor logits_TE = gate_and_route(r, x, wg_ED, gate_fp32, score_fn, normalize, capacity);
  if (slotted) {
    launch_slot_layout(r, l);
    launch_share(r, slot_capacity, launches.fc1_fixup, share);
  } else {
    launch_gathered_inverse(r, capacity, inv_R, rows_E);
  }
  launches.fc1.enqueue("gathered first GEMM (Triton)");
  Tensor y_RO;
  if (slotted) {   // every expert's C slots through cuBLAS's batched GEMM, then the rows it got wrong
    launches.fc1_fixup.enqueue("first GEMM of the overflow rows (Triton)");
    at::bmm_out(y_ECO, viewed(h_RH, {E, slot_capacity, H}), w.w2);
    launches.fc2_fixup.enqueue("second GEMM of the overflow rows (Triton)");
    y_RO = viewed(y_ECO, {R, O});
  } else if (capacity < 0) {
    y_RO = at::_grouped_mm(h_RH, w.w2, at::cumsum(r.counts_E(), 0, at::kInt));
  } else {   // [E, capacity, H] @ [E, H, O]; rows no choice feeds are computed and never read
    y_RO = viewed(at::bmm(viewed(h_RH, {E, capacity, H}), w.w2), {R, O});
  }
  h_RH.reset();   // dead once the second GEMM is enqueued (stream-ordered reuse)
  const Tensor y_TO = combine(y_RO, r, /*postscore=*/true, slotted ? l.slots() : nullptr);
  return forward_outputs(y_TO, logits_TE, r, want_gshard_loss, score_fn);
}

std::vector<at::Tensor> moe_forward_nograd_slotted(const at::Tensor& x_TD, const at::Tensor& wg_ED, bool gate_fp32,
                                                   int64_t k, int64_t score_fn, bool normalize, bool postscore,
                                                   const at::Tensor& w1_EHD, const at::Tensor& w2_EHO,
                                                   const std::optional<at::Tensor>& b1_EH, int64_t slot_capacity,
                                                   bool want_gshard_loss, const std::vector<int64_t>& fc1_fixup_ids,
                                                   const std::vector<int64_t>& fc2_fixup_ids,
                                                   const std::optional<at::Tensor>& share_host) {
  const ExpertWeights w{w1_EHD, w2_EHO, Tensor(), value_or_undefined(b1_EH), Tensor()};
  int64_t* share = share_host.has_value() ? checked_share(*share_host, true) : nullptr;
  check_inputs(x_TD, wg_ED, k, -1, /*grouped=*/false, /*dense=*/false, postscore, w, /*relu_epilogue=*/true);
  TORCH_CHECK(x_TD.scalar_type() == at::kBFloat16, "adaptmoe: the slot layout's fix-ups take bfloat16 tokens");
  const c10::cuda::CUDAGuard guard(x_TD.device());
  const at::NoGradGuard no_grad;
  const Tensor x = x_TD.contiguous();
  const int64_t T = x.size(0), E = wg_ED.size(0), D = x.size(1), H = w1_EHD.size(1), O = w2_EHO.size(2);
  const int64_t C = slot_capacity, S = E * slot_capacity;
  if (T * k == 0) return {};
  Routed r = alloc_routed_for(x, wg_ED, gate_fp32, k);
  const SlotLayout l = alloc_slot_layout(r, C, x.options());
  // Every buffer first, then the fix-up kernels whose specializations fit their addresses; one
  // missing: nothing was enqueued, the caller runs the same steps from Python.
  const Tensor x_SD = at::empty({S, D}, x.options());
  const Tensor h_SH = at::empty({S, H}, x.options());
  Tensor y_ECO = at::empty({E, C, O}, x.options());
  const void* b1 = w.b1.defined() ? w.b1.data_ptr() : nullptr;
  const RowsLaunch fc1_fixup = first_fitting(fc1_fixup_ids, slot_fixup(x_SD.data_ptr(), w.w1.data_ptr(), b1,
                                                                       h_SH.data_ptr(), l.rows_O(), l.over_E(), T * k, E,
                                                                       D, H, true, kEpilogueRelu));
  const RowsLaunch fc2_fixup = first_fitting(fc2_fixup_ids, slot_fixup(h_SH.data_ptr(), w.w2.data_ptr(), nullptr,
                                                                       y_ECO.data_ptr(), l.rows_O(), l.over_E(), T * k, E,
                                                                       H, O, false, kEpilogueNone));
  if (fc1_fixup.id < 0 || fc2_fixup.id < 0) return {};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const Tensor logits_TE = gate_and_route(r, x, wg_ED, gate_fp32, score_fn, normalize, /*capacity=*/-1);
  launch_slot_layout(r, l);
  launch_share(r, C, fc1_fixup, share);
  // Slots no choice feeds stay unwritten: their outputs are never read (the combine reads fed slots).
  torch_ops::check_launch(launch_scatter_located_rows(x.data_ptr(), torch_ops::dtype_of(x), l.slots(),
                                                      postscore ? nullptr : r.weights(), r.vals_dtype(), T,
                                                      static_cast<int>(k), D, C, r.counts(), E, /*zero_unfed=*/false,
                                                      x_SD.data_ptr(), stream),
                          "scatter");
  bmm_nt_act_into(x.scalar_type(), x.get_device(), x_SD.data_ptr(), w.w1.data_ptr(), b1, h_SH.data_ptr(), E, C, D, H,
                  kActRelu, /*allow_tf32=*/false);
  fc1_fixup.enqueue("first GEMM of the overflow rows (Triton)");
  at::bmm_out(y_ECO, viewed(h_SH, {E, C, H}), w.w2);
  fc2_fixup.enqueue("second GEMM of the overflow rows (Triton)");
  const Tensor y_TO = combine(viewed(y_ECO, {S, O}), r, postscore, l.slots());
  return forward_outputs(y_TO, logits_TE, r, want_gshard_loss, score_fn);
}

}  // namespace adaptmoe
