// The no-grad forward of a single-process MoE layer in one native call (see layer_forward.h).
// Why it exists: an eager forward from Python spent ~220 us of host time on the H100 machine's
// CPU before its first expert GEMM was enqueued (Python wrappers, a pybind crossing and a few
// allocations per op), while ~45 us of GPU work preceded that GEMM: the GPU idled for the rest.
// From C++ the same ops are enqueued right after one another: 60-150 us less host time per call
// there (scripts/ab_native_forward.py; each ATen call still costs ~15-20 us of host time).
#include "layer_forward.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <climits>

#include "blaslt.h"
#include "forward_parts.h"
#include "moe_kernels.h"
#include "torch_ops.h"

namespace adaptmoe {
namespace forward_parts {

using torch_ops::text;

namespace {

bool float_type(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

std::atomic<bool> g_gate_kernel_enabled{true};   // off: at::mm for every gate (an A/B switch)

// Whether launch_gate computes this gate's logits (then every path of the layer, the Python one
// through the gate_logits binding included, gets them from it: the same bits everywhere).
bool small_gate(const Tensor& x_TD, const Tensor& wg_ED) {
  return g_gate_kernel_enabled.load(std::memory_order_relaxed) && x_TD.scalar_type() == wg_ED.scalar_type() &&
         float_type(x_TD.scalar_type()) &&
         gate_kernel_serves(torch_ops::dtype_of(x_TD), torch_ops::dtype_of(wg_ED), wg_ED.size(0), wg_ED.size(1));
}

at::ScalarType logits_type(const Tensor& wg_ED, bool gate_fp32) { return gate_fp32 ? at::kFloat : wg_ED.scalar_type(); }

// launch_gate into logits_TE (K == 0) or with the top-k into r (K = r.k).
void launch_small_gate(const Tensor& x_TD, const Tensor& wg_ED, bool gate_fp32, const Tensor& logits_TE,
                       const Routed* r, int64_t score_fn, bool normalize, int64_t* tm_slots) {
  const Tensor x = x_TD.contiguous(), wg = wg_ED.contiguous();
  torch_ops::check_launch(
      launch_gate(x.data_ptr(), wg.data_ptr(), torch_ops::dtype_of(x), gate_fp32, x.size(0), x.size(1),
                  static_cast<int>(wg.size(0)), logits_TE.data_ptr(), r ? static_cast<int>(r->k) : 0,
                  score_fn == 1 ? kSigmoid : kSoftmax, normalize, r ? r->indices() : nullptr,
                  r ? r->weights() : nullptr, r ? r->scores() : nullptr, tm_slots,
                  c10::cuda::getCurrentCUDAStream()),
      "gate");
}

// The gates launch_gate does not serve. F.linear of a 2-D input without bias is exactly
// mm(x, w^T); calling mm skips two dispatcher hops.
Tensor mm_gate_logits(const Tensor& x_TD, const Tensor& wg_ED, bool gate_fp32) {
  if (gate_fp32) return at::mm(x_TD.to(at::kFloat), wg_ED.to(at::kFloat).t());
  const Tensor wg_DE = wg_ED.is_contiguous()
                           ? torch_ops::alias_strided(wg_ED, wg_ED.scalar_type(), 0, {wg_ED.size(1), wg_ED.size(0)},
                                                      {1, wg_ED.size(1)})
                           : wg_ED.t();
  return at::mm(x_TD.scalar_type() == wg_ED.scalar_type() ? x_TD : x_TD.to(wg_ED.scalar_type()), wg_DE);
}

}  // namespace

void set_gate_kernel_enabled(bool enabled) { g_gate_kernel_enabled.store(enabled); }

Tensor gate_logits(const Tensor& x_TD, const Tensor& wg_ED, bool gate_fp32) {
  if (!small_gate(x_TD, wg_ED)) return mm_gate_logits(x_TD, wg_ED, gate_fp32);
  const Tensor logits_TE = at::empty({x_TD.size(0), wg_ED.size(0)}, x_TD.options().dtype(logits_type(wg_ED, gate_fp32)));
  launch_small_gate(x_TD, wg_ED, gate_fp32, logits_TE, nullptr, 0, false, nullptr);
  return logits_TE;
}

// t.view(sizes) for a contiguous t, without the dispatcher (see torch_ops::alias).
Tensor viewed(const Tensor& t, at::IntArrayRef sizes) {
  if (!t.is_contiguous()) return t.reshape(sizes);
  Tensor v = alias(t, t.scalar_type(), 0, sizes);
  TORCH_INTERNAL_ASSERT(v.numel() == t.numel(), "adaptmoe: a view of another element count");
  return v;
}

// The routing buffer of T tokens over E experts, logits (and so scores, weights) in vals_type.
Routed alloc_routed(int64_t T, int64_t E, int64_t k, at::ScalarType vals_type, const at::TensorOptions& options) {
  const int64_t max_experts = std::min<int64_t>(kMaxTopkExperts, kMaxLocateExperts);
  TORCH_CHECK(E >= 1 && E <= max_experts, text("adaptmoe: native routing takes 1..", max_experts, " experts, got ", E));
  TORCH_CHECK(k >= 1 && k <= E, text("adaptmoe: top_k must be in [1, E], got ", k));
  TORCH_CHECK(T * k < INT32_MAX, "adaptmoe: T*k must fit in int32");
  Routed r;
  r.T = T, r.k = k, r.E = E;
  r.vals_type = vals_type;
  const int64_t workspace_ints = std::max<int64_t>(1, locate_workspace_ints(T, static_cast<int>(E), static_cast<int>(k)));
  r.buf = at::empty({r.workspace_offset() + 4 * workspace_ints}, options.dtype(at::kByte));
  return r;
}

// Slot assignment of r's top-k (launch_locate).
void launch_slots(const Routed& r, int64_t capacity) {
  torch_ops::check_launch(launch_locate(r.indices(), r.T, static_cast<int>(r.E), static_cast<int>(r.k), capacity,
                                        r.workspace(), r.locations(), r.counts(), r.slots(),
                                        c10::cuda::getCurrentCUDAStream()),
                          "slot assignment");
}

// Scores + top-k + slot assignment into r: the kernels of torch_ops::route_topk.
void launch_routing(const Routed& r, const Tensor& logits_TE, int64_t score_fn, bool normalize, int64_t capacity) {
  TORCH_CHECK(logits_TE.scalar_type() == r.vals_type, "adaptmoe: logits of another dtype than the routing buffer's");
  const int E = static_cast<int>(r.E), k = static_cast<int>(r.k);
  torch_ops::check_launch(launch_topk(logits_TE.data_ptr(), torch_ops::dtype_of(logits_TE), r.T, E, k,
                                      score_fn == 1 ? kSigmoid : kSoftmax, normalize, r.indices(), r.weights(),
                                      r.scores(), c10::cuda::getCurrentCUDAStream()),
                          "top-k");
  launch_slots(r, capacity);
}

// Routing with one allocation instead of route_topk's seven (the buffer above).
Routed route(const Tensor& logits_TE, int64_t k, int64_t score_fn, bool normalize, int64_t capacity) {
  Routed r = alloc_routed(logits_TE.size(0), logits_TE.size(1), k, logits_TE.scalar_type(), logits_TE.options());
  launch_routing(r, logits_TE, score_fn, normalize, capacity);
  return r;
}

Tensor gate_and_route(const Routed& r, const Tensor& x_TD, const Tensor& wg_ED, bool gate_fp32, int64_t score_fn,
                      bool normalize, int64_t capacity, int64_t* tm_slots) {
  TORCH_CHECK(r.vals_type == logits_type(wg_ED, gate_fp32), "adaptmoe: a routing buffer of another dtype than the logits'");
  if (small_gate(x_TD, wg_ED)) {
    const Tensor logits_TE = at::empty({r.T, r.E}, x_TD.options().dtype(r.vals_type));
    launch_small_gate(x_TD, wg_ED, gate_fp32, logits_TE, &r, score_fn, normalize, tm_slots);
    launch_slots(r, capacity);
    return logits_TE;
  }
  const Tensor logits_TE = mm_gate_logits(x_TD, wg_ED, gate_fp32);
  launch_routing(r, logits_TE, score_fn, normalize, capacity);
  if (tm_slots != nullptr) {
    torch_ops::check_launch(launch_token_major_slots(r.indices(), r.T, static_cast<int>(r.k), static_cast<int>(r.E),
                                                     tm_slots, c10::cuda::getCurrentCUDAStream()),
                            "token-major slots");
  }
  return logits_TE;
}

Routed alloc_routed_for(const Tensor& x_TD, const Tensor& wg_ED, bool gate_fp32, int64_t k) {
  return alloc_routed(x_TD.size(0), wg_ED.size(0), k, logits_type(wg_ED, gate_fp32), x_TD.options());
}

// y_TO[t] = sum_k w[t,k] * y_RO[slots[t,k]] (w absent: 1), without torch_ops::gather_rows's
// placeholder for the dot products nobody asked for. slots: r.slots() unless given.
Tensor combine(const Tensor& y_RO, const Routed& r, bool postscore, const int64_t* slots) {
  const int64_t O = y_RO.size(1);
  Tensor y_TO = at::empty({r.T, O}, y_RO.options());
  const Tensor y = y_RO.contiguous();
  torch_ops::check_launch(launch_gather_rows(y.data_ptr(), torch_ops::dtype_of(y), slots ? slots : r.slots(),
                                             postscore ? r.weights() : nullptr, r.vals_dtype(), nullptr,
                                             r.T, static_cast<int>(r.k), O, y.size(0), y_TO.data_ptr(), nullptr,
                                             kFloat32, c10::cuda::getCurrentCUDAStream()),
                          "gather");
  return y_TO;
}

// A forward's outputs (layer_forward.h), the gshard loss enqueued last: its two small kernels run
// after the combine (~5 us of GPU time) instead of delaying the dispatch, and replace the five ATen
// ops of the Python losses (~45 us of host time per call on the H100 machine).
std::vector<Tensor> forward_outputs(const Tensor& y_TO, const Tensor& logits_TE, const Routed& r, bool want_gshard_loss,
                                    int64_t score_fn) {
  std::vector<Tensor> out{y_TO, logits_TE};
  for (Tensor& t : r.views()) out.push_back(std::move(t));
  out.push_back(want_gshard_loss ? torch_ops::gshard_loss(out[4], out[2], score_fn == 1) : Tensor());
  return out;
}

void check_gate_inputs(const Tensor& x_TD, const Tensor& wg_ED) {
  TORCH_CHECK(x_TD.is_cuda() && x_TD.dim() == 2, "adaptmoe: x_TD must be a 2-D CUDA tensor");
  torch_ops::check_cuda(wg_ED, "wg_ED", x_TD);
  TORCH_CHECK(wg_ED.dim() == 2 && wg_ED.size(1) == x_TD.size(1), "adaptmoe: wg_ED must be (E, D) with x_TD's D");
}

void check_inputs(const Tensor& x_TD, const Tensor& wg_ED, int64_t k, int64_t capacity, bool grouped, bool dense,
                  bool postscore, const ExpertWeights& w, bool relu_epilogue) {
  check_gate_inputs(x_TD, wg_ED);
  torch_ops::dtype_of(x_TD);   // a dtype the kernels take
  const int64_t E = wg_ED.size(0);
  TORCH_CHECK(w.w1.dim() == 3 && w.w2.dim() == 3 && w.w1.size(0) == E && w.w2.size(0) == E &&
                  w.w1.size(2) == x_TD.size(1) && w.w2.size(1) == w.w1.size(1),
              "adaptmoe: w1 must be (E, H, D) and w2 (E, H, O) over the gate's E experts");
  for (const Tensor* t : {&w.w1, &w.w2, &w.w3, &w.b1, &w.b2}) {
    if (!t->defined()) continue;
    torch_ops::check_cuda(*t, "expert weight", x_TD);
    TORCH_CHECK(t->scalar_type() == x_TD.scalar_type(), text("adaptmoe: expert weights must have x's dtype ",
                x_TD.scalar_type(), ", got ", t->scalar_type()));
  }
  TORCH_CHECK(!grouped || (capacity < 0 && x_TD.scalar_type() == at::kBFloat16),
              "adaptmoe: the grouped layout takes dropless bf16 rows");
  TORCH_CHECK(!relu_epilogue || (!grouped && !w.w3.defined() && x_TD.size(1) > 0 && w.w1.is_contiguous() &&
                                  (!w.b1.defined() || w.b1.is_contiguous())),
              "adaptmoe: the relu epilogue takes the padded layout, no w3, D > 0, contiguous w1 and b1");
  TORCH_CHECK(!dense || (!grouped && k == E && postscore && x_TD.size(0) > 0 && (capacity < 0 || capacity >= x_TD.size(0))),
              "adaptmoe: the dense layout takes k == E, post-scored, no dropped choice, T > 0");
}

}  // namespace forward_parts

namespace {

using namespace forward_parts;
using torch_ops::text;

Tensor apply_activation(const Tensor& h, int64_t act) {
  switch (act) {
    case kActIdentity: return h;
    case kActRelu: return at::relu(h);
    case kActGelu: return at::gelu(h);
    case kActGeluTanh: return at::gelu(h, "tanh");
    case kActSilu: return at::silu(h);
    case kActTanh: return at::tanh(h);
    case kActSigmoid: return at::sigmoid(h);
    default: TORCH_CHECK(false, text("adaptmoe: unknown activation code ", act));
  }
  return h;
}

// The dispatch into r.x_RD, 3 launches fewer than torch_ops::scatter_rows: no inverse map, and the
// padded rows no choice feeds are left unwritten (their FFN outputs are never gathered: the
// combine reads kept slots only), which saved a 7 us zeroing kernel (fine-grained cf=1, H100).
void dispatch(Routed& r, const Tensor& x_TD, int64_t capacity, bool postscore) {
  const int64_t D = x_TD.size(1);
  r.x_RD = at::empty({capacity < 0 ? r.T * r.k : r.E * capacity, D}, x_TD.options());
  torch_ops::check_launch(launch_scatter_located_rows(x_TD.data_ptr(), torch_ops::dtype_of(x_TD), r.slots(),
                                                      postscore ? nullptr : r.weights(), r.vals_dtype(),
                                                      r.T, static_cast<int>(r.k), D, capacity, r.counts(), r.E,
                                                      /*zero_unfed=*/false, r.x_RD.data_ptr(),
                                                      c10::cuda::getCurrentCUDAStream()),
                          "scatter");
}

// Mirrors adaptmoe.expert_compute.ffn_padded (and the fused relu GEMM of ops._fused_gemm).
Tensor ffn_padded(const Tensor& x_eCD, const ExpertWeights& w, int64_t act, bool relu_epilogue, bool allow_tf32) {
  Tensor h_eCH;
  if (relu_epilogue) {
    const int64_t e = x_eCD.size(0), C = x_eCD.size(1), D = x_eCD.size(2), H = w.w1.size(1);
    h_eCH = at::empty({e, C, H}, x_eCD.options());
    bmm_nt_act_into(x_eCD.scalar_type(), x_eCD.get_device(), x_eCD.data_ptr(), w.w1.data_ptr(),
                    w.b1.defined() ? w.b1.data_ptr() : nullptr, h_eCH.data_ptr(), e, C, D, H, kActRelu, allow_tf32);
  } else {
    h_eCH = at::bmm(x_eCD, w.w1.transpose(1, 2));
    if (w.b1.defined()) h_eCH = h_eCH + w.b1.unsqueeze(1);
    h_eCH = w.w3.defined() ? torch_ops::act_mul(h_eCH, at::bmm(x_eCD, w.w3.transpose(1, 2)), act)
                           : apply_activation(h_eCH, act);
  }
  Tensor y_eCO = at::bmm(h_eCH, w.w2);
  if (w.b2.defined()) y_eCO = y_eCO + w.b2.unsqueeze(1);
  return y_eCO;
}

// Every token goes to every expert unscaled (k == E, nothing dropped, post-scored): the dispatch
// is the identity, so the first GEMM reads the tokens themselves, for all experts at once
// (N = E*H: x_TD @ [w1_0; ...; w1_E-1]^T). h_TN [T, E*H]; ffn_padded's ops otherwise.
Tensor dense_first_gemm(const Tensor& x_TD, const ExpertWeights& w, int64_t act, bool relu_epilogue,
                        bool allow_tf32) {
  const int64_t E = w.w1.size(0), H = w.w1.size(1), D = w.w1.size(2), T = x_TD.size(0);
  if (relu_epilogue) {   // w1 [E, H, D] is [E*H, D] as it lies; b1 [E, H] is [E*H]
    Tensor h_TN = at::empty({T, E * H}, x_TD.options());
    bmm_nt_act_into(x_TD.scalar_type(), x_TD.get_device(), x_TD.data_ptr(), w.w1.data_ptr(),
                    w.b1.defined() ? w.b1.data_ptr() : nullptr, h_TN.data_ptr(), 1, T, D, E * H, kActRelu, allow_tf32);
    return h_TN;
  }
  const Tensor w1_ND = w.w1.reshape({E * H, D});
  Tensor h_TN = at::mm(x_TD, w1_ND.t());
  if (w.b1.defined()) h_TN = h_TN + w.b1.reshape({E * H});
  return w.w3.defined() ? torch_ops::act_mul(h_TN, at::mm(x_TD, w.w3.reshape({E * H, D}).t()), act)
                        : apply_activation(h_TN, act);
}

// The second GEMM per expert over its column block of h_TN ([E, T, H] view, row stride E*H: no
// copy), then the combine over token-major slots tm_slots_TK (e * T + t).
Tensor dense_second_gemm_and_combine(const Tensor& h_TN, const Routed& r, const ExpertWeights& w,
                                     const int64_t* tm_slots_TK) {
  const int64_t E = w.w2.size(0), H = w.w2.size(1), O = w.w2.size(2), T = r.T;
  const Tensor h_ETH = h_TN.is_contiguous()   // [E, T, H] with row stride E*H
                           ? torch_ops::alias_strided(h_TN, h_TN.scalar_type(), 0, {E, T, H}, {H, E * H, 1})
                           : h_TN.view({T, E, H}).transpose(0, 1);
  Tensor y_ETO = at::bmm(h_ETH, w.w2);
  if (w.b2.defined()) y_ETO = y_ETO + w.b2.unsqueeze(1);
  return combine(viewed(y_ETO, {E * T, O}), r, /*postscore=*/true, tm_slots_TK);
}

// Bias rows of the grouped layout, added in float32 (mirrors expert_compute._ffn_grouped_mm).
Tensor add_row_bias(const Tensor& h_RH, const Tensor& b_EH, const Tensor& rows_R) {
  return (h_RH + b_EH.to(at::kFloat).index_select(0, rows_R)).to(at::kBFloat16);
}

// Mirrors adaptmoe.expert_compute._ffn_grouped_mm without autocast: bf16 rows, int32 offsets.
Tensor ffn_grouped(const Tensor& x_RD, const Tensor& counts_E, const ExpertWeights& w, int64_t act) {
  const int64_t R = x_RD.size(0), E = counts_E.numel();
  const Tensor offs_E = at::cumsum(counts_E, 0, at::kInt);
  Tensor rows_R;   // expert of each row, built when a bias needs it
  auto expert_of_rows = [&]() {
    if (!rows_R.defined()) {
      rows_R = at::searchsorted(offs_E, at::arange(R, offs_E.options()), /*out_int32=*/false, /*right=*/true)
                   .clamp_max_(E - 1);
    }
    return rows_R;
  };
  Tensor h_RH = at::_grouped_mm(x_RD, w.w1.transpose(1, 2), offs_E);
  if (w.b1.defined()) h_RH = add_row_bias(h_RH, w.b1, expert_of_rows());
  if (w.w3.defined()) {
    h_RH = torch_ops::act_mul(h_RH, at::_grouped_mm(x_RD, w.w3.transpose(1, 2), offs_E), act);
  } else if (act == kActRelu) {
    h_RH.relu_();   // no autograd here: in place, no second R x H buffer
  } else {
    h_RH = apply_activation(h_RH, act);
  }
  Tensor y_RO = at::_grouped_mm(h_RH, w.w2, offs_E);
  if (w.b2.defined()) y_RO = add_row_bias(y_RO, w.b2, expert_of_rows());
  return y_RO;
}

}  // namespace

std::vector<at::Tensor> moe_forward_nograd(const at::Tensor& x_TD, const at::Tensor& wg_ED, bool gate_fp32, int64_t k,
                                           int64_t score_fn, bool normalize, int64_t capacity, bool postscore,
                                           bool grouped, const at::Tensor& w1_EHD, const at::Tensor& w2_EHO,
                                           const std::optional<at::Tensor>& w3_EHD,
                                           const std::optional<at::Tensor>& b1_EH,
                                           const std::optional<at::Tensor>& b2_EO, int64_t act, bool relu_epilogue,
                                           bool allow_tf32, bool want_gshard_loss, bool dense) {
  const ExpertWeights w{w1_EHD, w2_EHO, value_or_undefined(w3_EHD), value_or_undefined(b1_EH), value_or_undefined(b2_EO)};
  check_inputs(x_TD, wg_ED, k, capacity, grouped, dense, postscore, w, relu_epilogue);
  const c10::cuda::CUDAGuard guard(x_TD.device());
  const at::NoGradGuard no_grad;
  const Tensor x = x_TD.contiguous();
  // Dense: the first GEMM needs no routing, so it goes first; the GPU runs it while the host
  // enqueues gate and routing (an isolated call no longer waits for those launches).
  const Tensor h_TN = dense ? dense_first_gemm(x, w, act, relu_epilogue, allow_tf32) : Tensor();
  const int64_t D = x_TD.size(1), E = wg_ED.size(0), O = w2_EHO.size(2);
  Routed r = alloc_routed_for(x, wg_ED, gate_fp32, k);
  const Tensor tm_slots = dense ? at::empty({x.size(0) * k}, x.options().dtype(at::kLong)) : Tensor();
  const Tensor logits_TE = gate_and_route(r, x, wg_ED, gate_fp32, score_fn, normalize, capacity,
                                          dense ? tm_slots.data_ptr<int64_t>() : nullptr);
  Tensor y_TO;
  if (dense) {
    y_TO = dense_second_gemm_and_combine(h_TN, r, w, tm_slots.data_ptr<int64_t>());
  } else {
    dispatch(r, x, capacity, postscore);
    const int64_t R = r.x_RD.size(0);
    Tensor y_RO;
    if (R == 0) {
      y_RO = at::empty({0, O}, x_TD.options());
    } else if (grouped) {
      y_RO = ffn_grouped(r.x_RD, r.counts_E(), w, act);
    } else {
      y_RO = viewed(ffn_padded(viewed(r.x_RD, {E, R / E, D}), w, act, relu_epilogue, allow_tf32), {R, O});
    }
    r.x_RD.reset();   // dead once the FFN is enqueued: the allocator may reuse it (stream-ordered)
    // Pre-scored rows combine with weight 1: no weights at all is the same arithmetic (x * 1.0f).
    y_TO = combine(y_RO, r, postscore);
  }
  return forward_outputs(y_TO, logits_TE, r, want_gshard_loss, score_fn);
}

}  // namespace adaptmoe
