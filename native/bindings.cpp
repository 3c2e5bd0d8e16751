// Torch-facing side of the native kernels: argument checks, output allocation (the caching
// allocator, so CUDA-graph capture works), the current stream, and the Python module.
// The torch.library op registration lives in Python (adaptmoe/ops/_ops.py), which calls these.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <climits>
#include <optional>
#include <tuple>

#include "blaslt.h"
#include "forward_parts.h"
#include "layer_forward.h"
#include "slotted_gemm.h"
#include "moe_kernels.h"
#include "torch_ops.h"
#include "triton_launch.h"

namespace adaptmoe::torch_ops {

Tensor checked_slots(const Tensor& slots_TK, const Tensor& like) {
  check_cuda(slots_TK, "slots_TK", like);
  TORCH_CHECK(slots_TK.dim() == 2, "adaptmoe: slots_TK must be (T, K)");
  TORCH_CHECK(slots_TK.scalar_type() == at::kLong, "adaptmoe: slots_TK must be int64");
  return slots_TK.contiguous();
}

std::optional<Tensor> checked_tk(const std::optional<Tensor>& w, const Tensor& slots, const Tensor& like, const char* name) {
  if (!w.has_value()) return std::nullopt;
  check_cuda(*w, name, like);
  TORCH_CHECK(w->sizes() == slots.sizes(), text("adaptmoe: ", name, " must have the shape of slots_TK"));
  dtype_of(*w);
  return w->contiguous();
}

// The rows a backward dots with the moved rows (n of them, src's width and dtype), when given.
std::optional<Tensor> checked_dot_rows(const std::optional<Tensor>& dot, const Tensor& src, int64_t n) {
  if (!dot.has_value()) return std::nullopt;
  check_cuda(*dot, "dot rows", src);
  TORCH_CHECK(dot->scalar_type() == src.scalar_type() && dot->dim() == 2 && dot->size(0) == n &&
                  dot->size(1) == src.size(1),
              text("adaptmoe: dot rows must be (", n, ", ", src.size(1), ") of the rows' dtype"));
  return dot->contiguous();
}

// The gate's logits as the native forwards compute them (forward_parts::gate_logits), so that the
// Python path of a no-grad call routes on the same bits.
Tensor gate_logits(const Tensor& x_TD, const Tensor& wg_ED, bool fp32) {
  adaptmoe::forward_parts::check_gate_inputs(x_TD, wg_ED);
  const c10::cuda::CUDAGuard guard(x_TD.device());
  const at::NoGradGuard no_grad;
  return adaptmoe::forward_parts::gate_logits(x_TD, wg_ED, fp32);
}

// Returns (indices_TK int64, weights_TK, scores_TE (empty unless want_scores), locations_TK, counts_E, slots_TK).
std::vector<Tensor> route_topk(const Tensor& logits_TE, int64_t k, int64_t score_fn, bool normalize,
                               int64_t capacity, bool want_scores) {
  const auto dt = check_rows(logits_TE, "logits_TE");
  const c10::cuda::CUDAGuard guard(logits_TE.device());
  const Tensor logits = logits_TE.contiguous();
  const int64_t T = logits.size(0), E = logits.size(1);
  check_experts(E, adaptmoe::kMaxTopkExperts, "native top-k");
  TORCH_CHECK(k >= 1 && k <= E, text("adaptmoe: top_k must be in [1, E], got ", k));
  TORCH_CHECK(T * k < INT32_MAX, "adaptmoe: T*k must fit in int32");
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto lopt = logits.options().dtype(at::kLong);
  Tensor indices = at::empty({T, k}, lopt);
  Tensor weights = at::empty({T, k}, logits.options());
  Tensor scores = want_scores ? at::empty({T, E}, logits.options()) : at::empty({0}, logits.options());
  check_launch(adaptmoe::launch_topk(logits.data_ptr(), dt, T, static_cast<int>(E), static_cast<int>(k),
                                     score_fn == 1 ? adaptmoe::kSigmoid : adaptmoe::kSoftmax, normalize,
                                     indices.data_ptr<int64_t>(), weights.data_ptr(),
                                     want_scores ? scores.data_ptr() : nullptr, stream),
               "top-k");
  Tensor locations = at::empty({T, k}, lopt);
  Tensor slots = at::empty({T, k}, lopt);
  Tensor counts = at::empty({E}, lopt);
  Tensor ws = at::empty({std::max<int64_t>(1, adaptmoe::locate_workspace_ints(T, E, k))}, logits.options().dtype(at::kInt));
  check_launch(adaptmoe::launch_locate(indices.data_ptr<int64_t>(), T, static_cast<int>(E), static_cast<int>(k), capacity,
                                       ws.data_ptr<int>(), locations.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                       slots.data_ptr<int64_t>(), stream),
               "slot assignment");
  return {indices, weights, scores, locations, counts, slots};
}

// d loss / d scores_TE [T, E] (dtype) of gshard_loss without row normalisation, for the loss's
// gradient grad (0-dim float32 on the GPU): no host read of it.
Tensor gshard_loss_backward(const Tensor& indices_TK, const Tensor& grad, int64_t num_experts, at::ScalarType dtype) {
  const Tensor idx = checked_indices(indices_TK, indices_TK);
  check_cuda(grad, "grad", indices_TK);
  TORCH_CHECK(grad.numel() == 1 && grad.scalar_type() == at::kFloat, "adaptmoe: grad must be one float32 value");
  check_experts(num_experts, adaptmoe::kMaxTopkExperts, "the gshard loss");
  const c10::cuda::CUDAGuard guard(indices_TK.device());
  const Tensor g = grad.contiguous();
  const int64_t T = idx.size(0);
  Tensor out = at::empty({T, num_experts}, idx.options().dtype(dtype));
  check_launch(adaptmoe::launch_gshard_loss_backward(idx.data_ptr<int64_t>(), T, static_cast<int>(num_experts),
                                                     static_cast<int>(idx.size(1)), g.data_ptr<float>(), dtype_of(out),
                                                     out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "gshard loss backward");
  return out;
}

// d loss / d logits_TE of route_topk's weights_TK and scores_TE (see launch_topk_backward); either
// gradient may be None (no gradient reached it).
Tensor route_topk_backward(const Tensor& logits_TE, const Tensor& indices_TK, const std::optional<Tensor>& grad_w_TK,
                           const std::optional<Tensor>& grad_scores_TE, int64_t score_fn, bool normalize) {
  const auto dt = check_rows(logits_TE, "logits_TE");
  const int64_t T = logits_TE.size(0), E = logits_TE.size(1);
  const Tensor indices = checked_indices(indices_TK, logits_TE, T);
  const int64_t k = indices.size(1);
  check_experts(E, adaptmoe::kMaxTopkExperts, "native top-k backward");
  TORCH_CHECK(k <= E, text("adaptmoe: top-k backward needs k <= E, got E=", E, ", k=", k));
  auto grad_of = [&](const std::optional<Tensor>& g, const char* name, at::IntArrayRef shape) -> Tensor {
    if (!g.has_value() || !g->defined()) return Tensor();
    check_cuda(*g, name, logits_TE);
    TORCH_CHECK(g->sizes() == shape && g->scalar_type() == logits_TE.scalar_type(),
                text("adaptmoe: ", name, " must have shape ", shape, " and logits_TE's dtype"));
    return g->contiguous();
  };
  const Tensor grad_w = grad_of(grad_w_TK, "grad_w_TK", indices_TK.sizes());
  const Tensor grad_scores = grad_of(grad_scores_TE, "grad_scores_TE", logits_TE.sizes());
  const c10::cuda::CUDAGuard guard(logits_TE.device());
  const Tensor logits = logits_TE.contiguous();
  Tensor grad_logits = at::empty({T, E}, logits.options());
  check_launch(adaptmoe::launch_topk_backward(logits.data_ptr(), dt, indices.data_ptr<int64_t>(),
                                              grad_w.defined() ? grad_w.data_ptr() : nullptr,
                                              grad_scores.defined() ? grad_scores.data_ptr() : nullptr, T,
                                              static_cast<int>(E), static_cast<int>(k),
                                              score_fn == 1 ? adaptmoe::kSigmoid : adaptmoe::kSoftmax, normalize,
                                              grad_logits.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "top-k backward");
  return grad_logits;
}

// GShard loss (0-dim float32) of scores_TE and the first choices indices_TK[:, 0]; rows of scores
// divided by their sum first when normalize_rows (see launch_gshard_loss).
Tensor gshard_loss(const Tensor& scores_TE, const Tensor& indices_TK, bool normalize_rows) {
  const auto dt = check_rows(scores_TE, "scores_TE");
  const int64_t T = scores_TE.size(0), E = scores_TE.size(1);
  const Tensor idx = checked_indices(indices_TK, scores_TE, T);
  check_experts(E, adaptmoe::kMaxTopkExperts, "the gshard loss");
  const c10::cuda::CUDAGuard guard(scores_TE.device());
  const Tensor scores = scores_TE.contiguous();
  Tensor buf = at::empty({1 + adaptmoe::gshard_loss_workspace_floats(T, static_cast<int>(E))}, scores.options().dtype(at::kFloat));
  check_launch(adaptmoe::launch_gshard_loss(scores.data_ptr(), dt, idx.data_ptr<int64_t>(), T, static_cast<int>(E),
                                            static_cast<int>(idx.size(1)), normalize_rows, buf.data_ptr<float>() + 1,
                                            buf.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
               "gshard loss");
  return alias(buf, at::kFloat, 0, {});   // buf[0], 0-dim
}

// Returns (locations_TK, counts_E, slots_TK) for given expert choices.
std::vector<Tensor> assign_slots(const Tensor& indices_TK, int64_t num_experts, int64_t capacity) {
  TORCH_CHECK(indices_TK.is_cuda() && indices_TK.dim() == 2 && indices_TK.scalar_type() == at::kLong,
              "adaptmoe: indices_TK must be a 2-D int64 CUDA tensor");
  check_experts(num_experts, adaptmoe::kMaxLocateExperts, "native slot assignment");
  const c10::cuda::CUDAGuard guard(indices_TK.device());
  const Tensor idx = indices_TK.contiguous();
  const int64_t T = idx.size(0), K = idx.size(1);
  TORCH_CHECK(T * K < INT32_MAX, "adaptmoe: T*k must fit in int32");
  auto stream = c10::cuda::getCurrentCUDAStream();
  Tensor locations = at::empty({T, K}, idx.options());
  Tensor slots = at::empty({T, K}, idx.options());
  Tensor counts = at::empty({num_experts}, idx.options());
  Tensor ws = at::empty({std::max<int64_t>(1, adaptmoe::locate_workspace_ints(T, static_cast<int>(num_experts), static_cast<int>(K)))},
                        idx.options().dtype(at::kInt));
  check_launch(adaptmoe::launch_locate(idx.data_ptr<int64_t>(), T, static_cast<int>(num_experts), static_cast<int>(K), capacity,
                                       ws.data_ptr<int>(), locations.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                                       slots.data_ptr<int64_t>(), stream),
               "slot assignment");
  return {locations, counts, slots};
}

// Whether the layout kernels can write into this host tensor (pinned, mapped, one int64).
bool host_writable(const Tensor& host) { return host_count_pointer(host) != nullptr; }

// share_host[0] = the fix-up rows a slot layout of these counts would cost, per 1024 of the n
// routed rows (launch_overflow_fixup_share), written by a kernel when it runs.
void overflow_fixup_share(const Tensor& counts_E, int64_t capacity, int64_t row_tile, int64_t n,
                          const Tensor& share_host) {
  TORCH_CHECK(counts_E.is_cuda() && counts_E.dim() == 1 && counts_E.scalar_type() == at::kLong &&
                  counts_E.is_contiguous(),
              "adaptmoe: counts_E must be a contiguous int64 (E,) CUDA tensor");
  check_experts(counts_E.size(0), INT32_MAX, "the fix-up share");
  int64_t* share = checked_host_count(share_host, "share_host");
  const c10::cuda::CUDAGuard guard(counts_E.device());
  check_launch(adaptmoe::launch_overflow_fixup_share(counts_E.data_ptr<int64_t>(), static_cast<int>(counts_E.size(0)),
                                                     capacity, row_tile, n, share,
                                                     c10::cuda::getCurrentCUDAStream()),
               "fix-up share");
}

// A dropless routing laid out in `capacity` slots per expert (launch_overflow_layout) for the
// training path of adaptmoe/ops/_triton_slotted.py: (slots_TK, rows_O [T*K], over_E, hosted_E,
// touched (0-dim)), int64 views of one buffer: one allocation and one launch. touched_host (a
// tensor host_writable accepts): gets touched too, written by the kernel when it runs.
std::vector<Tensor> overflow_layout(const Tensor& indices_TK, const Tensor& locations_TK, const Tensor& counts_E,
                                    int64_t capacity, const std::optional<Tensor>& touched_host) {
  const Tensor idx = checked_indices(indices_TK, indices_TK);
  const Tensor loc = checked_indices(locations_TK, indices_TK, idx.size(0));
  check_cuda(counts_E, "counts_E", indices_TK);
  TORCH_CHECK(counts_E.dim() == 1 && counts_E.scalar_type() == at::kLong && loc.size(1) == idx.size(1),
              "adaptmoe: counts_E must be int64 (E,), locations_TK shaped as indices_TK");
  const int64_t T = idx.size(0), K = idx.size(1), E = counts_E.size(0), n = T * K;
  check_experts(E, adaptmoe::kMaxLocateExperts, "the slot layout");
  TORCH_CHECK(capacity >= 0 && E * capacity >= n && E * capacity < INT32_MAX,
              text("adaptmoe: capacity must give E * capacity >= T*k slots (fewer than 2^31), got ", capacity));
  const c10::cuda::CUDAGuard guard(indices_TK.device());
  const Tensor counts = counts_E.contiguous();
  int64_t* host_ptr = touched_host.has_value() ? checked_host_count(*touched_host, "touched_host") : nullptr;
  const Tensor buf = at::empty({2 * n + 2 * E + 1}, idx.options());
  int64_t* p = buf.data_ptr<int64_t>();
  check_launch(adaptmoe::launch_overflow_layout(idx.data_ptr<int64_t>(), loc.data_ptr<int64_t>(),
                                                counts.data_ptr<int64_t>(), T, static_cast<int>(E),
                                                static_cast<int>(K), capacity, p, p + n, nullptr, p + 2 * n,
                                                p + 2 * n + E, p + 2 * n + 2 * E, host_ptr, nullptr, nullptr,
                                                c10::cuda::getCurrentCUDAStream()),
               "slot layout");
  return {alias(buf, at::kLong, 0, {T, K}), alias(buf, at::kLong, n * 8, {n}), alias(buf, at::kLong, 2 * n * 8, {E}),
          alias(buf, at::kLong, (2 * n + E) * 8, {E}), alias(buf, at::kLong, (2 * n + 2 * E) * 8, {})};
}

// Returns (out_RD, dot_TK (empty unless dot_RD)).
std::vector<Tensor> scatter_rows(const Tensor& src_TD, const Tensor& slots_TK, int64_t num_rows,
                                 const std::optional<Tensor>& w_TK, const std::optional<Tensor>& dot_RD) {
  const auto dt = check_rows(src_TD, "rows");
  const c10::cuda::CUDAGuard guard(src_TD.device());
  const Tensor src = src_TD.contiguous();
  const Tensor slots = checked_slots(slots_TK, src);
  TORCH_CHECK(slots.size(0) == src.size(0), "adaptmoe: slots_TK and rows disagree on T");
  TORCH_CHECK(slots.numel() < INT32_MAX, "adaptmoe: T*k must fit in int32");
  const auto w = checked_tk(w_TK, slots, src, "scale/weights");
  const std::optional<Tensor> dot = checked_dot_rows(dot_RD, src, num_rows);
  const int64_t T = src.size(0), D = src.size(1), K = slots.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  Tensor out = at::empty({num_rows, D}, src.options());
  const auto dot_dtype = w.has_value() ? w->scalar_type() : at::kFloat;
  Tensor dot_out = dot.has_value() ? at::empty({T, K}, src.options().dtype(dot_dtype)) : at::empty({0}, src.options().dtype(dot_dtype));
  Tensor ws = at::empty({std::max<int64_t>(1, num_rows)}, src.options().dtype(at::kInt));
  check_launch(adaptmoe::launch_scatter_rows(src.data_ptr(), dt, slots.data_ptr<int64_t>(),
                                             w.has_value() ? w->data_ptr() : nullptr,
                                             w.has_value() ? dtype_of(*w) : adaptmoe::kFloat32,
                                             dot.has_value() ? dot->data_ptr() : nullptr, T, static_cast<int>(K), D,
                                             num_rows, ws.data_ptr<int>(), out.data_ptr(),
                                             dot.has_value() ? dot_out.data_ptr() : nullptr, dtype_of(dot_out), stream),
               "scatter");
  return {out, dot_out};
}

// The no-grad layer forward's dispatch (launch_scatter_located_rows), exposed for its tests: slots
// and counts_E as the slot assignment makes them; capacity < 0 is dropless; zero_unfed: whether the
// padded rows no choice feeds become 0 (the layer forward leaves them unwritten).
Tensor scatter_located_rows(const Tensor& src_TD, const Tensor& slots_TK, const Tensor& counts_E, int64_t capacity,
                            const std::optional<Tensor>& w_TK, bool zero_unfed) {
  const auto dt = check_rows(src_TD, "rows");
  const c10::cuda::CUDAGuard guard(src_TD.device());
  const Tensor src = src_TD.contiguous();
  const Tensor slots = checked_slots(slots_TK, src);
  TORCH_CHECK(slots.size(0) == src.size(0) && slots.numel() < INT32_MAX, "adaptmoe: slots_TK must be (T, K) of rows' T");
  check_cuda(counts_E, "counts_E", src);
  TORCH_CHECK(counts_E.dim() == 1 && counts_E.scalar_type() == at::kLong, "adaptmoe: counts_E must be 1-D int64");
  const Tensor counts = counts_E.contiguous();
  const auto w = checked_tk(w_TK, slots, src, "scale");
  const int64_t T = src.size(0), D = src.size(1), K = slots.size(1), E = counts.numel();
  Tensor out = at::empty({capacity < 0 ? T * K : E * capacity, D}, src.options());
  check_launch(adaptmoe::launch_scatter_located_rows(src.data_ptr(), dt, slots.data_ptr<int64_t>(),
                                                     w.has_value() ? w->data_ptr() : nullptr,
                                                     w.has_value() ? dtype_of(*w) : adaptmoe::kFloat32, T,
                                                     static_cast<int>(K), D, capacity, counts.data_ptr<int64_t>(), E,
                                                     zero_unfed, out.data_ptr(), c10::cuda::getCurrentCUDAStream()),
               "scatter (located rows)");
  return out;
}

// Returns (out_TD, dot_TK (empty unless dot_TD)).
std::vector<Tensor> gather_rows(const Tensor& src_RD, const Tensor& slots_TK, const std::optional<Tensor>& w_TK,
                                const std::optional<Tensor>& dot_TD) {
  const auto dt = check_rows(src_RD, "rows");
  const c10::cuda::CUDAGuard guard(src_RD.device());
  const Tensor src = src_RD.contiguous();
  const Tensor slots = checked_slots(slots_TK, src);
  const auto w = checked_tk(w_TK, slots, src, "scale/weights");
  const int64_t T = slots.size(0), K = slots.size(1), D = src.size(1), R = src.size(0);
  const std::optional<Tensor> dot = checked_dot_rows(dot_TD, src, T);
  auto stream = c10::cuda::getCurrentCUDAStream();
  Tensor out = at::empty({T, D}, src.options());
  const auto dot_dtype = w.has_value() ? w->scalar_type() : at::kFloat;
  Tensor dot_out = dot.has_value() ? at::empty({T, K}, src.options().dtype(dot_dtype)) : at::empty({0}, src.options().dtype(dot_dtype));
  check_launch(adaptmoe::launch_gather_rows(src.data_ptr(), dt, slots.data_ptr<int64_t>(),
                                            w.has_value() ? w->data_ptr() : nullptr,
                                            w.has_value() ? dtype_of(*w) : adaptmoe::kFloat32,
                                            dot.has_value() ? dot->data_ptr() : nullptr, T, static_cast<int>(K), D, R,
                                            out.data_ptr(), dot.has_value() ? dot_out.data_ptr() : nullptr,
                                            dtype_of(dot_out), stream),
               "gather");
  return {out, dot_out};
}

Tensor checked_weight(const std::optional<Tensor>& t, const Tensor& x, const char* name, std::vector<int64_t> shape) {
  if (!t.has_value()) return Tensor();
  check_cuda(*t, name, x);
  TORCH_CHECK(t->scalar_type() == x.scalar_type(), text("adaptmoe: ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t->scalar_type()));
  TORCH_CHECK(t->sizes() == at::IntArrayRef(shape), text("adaptmoe: ", name, " must have shape ", at::IntArrayRef(shape),
              ", got ", t->sizes()));
  Tensor c = t->contiguous();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0, text("adaptmoe: ", name, " must be 16-byte aligned"));
  return c;
}

// act(g) * u elementwise (inference: no autograd); act: Activation code.
Tensor act_mul(const Tensor& g, const Tensor& u, int64_t act) {
  TORCH_CHECK(g.is_cuda() && u.is_cuda() && g.device() == u.device(), "adaptmoe: act_mul takes g, u on one CUDA device");
  TORCH_CHECK(g.sizes() == u.sizes() && g.scalar_type() == u.scalar_type(), "adaptmoe: act_mul needs g and u of one shape and dtype");
  TORCH_CHECK(act >= adaptmoe::kActIdentity && act <= adaptmoe::kActSigmoid, "adaptmoe: unknown activation code");
  const auto dt = dtype_of(g);
  const c10::cuda::CUDAGuard guard(g.device());
  const Tensor gc = g.contiguous(), uc = u.contiguous();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(gc.data_ptr()) % 16 == 0 && reinterpret_cast<uintptr_t>(uc.data_ptr()) % 16 == 0,
              "adaptmoe: act_mul needs 16-byte aligned g and u");
  Tensor out = at::empty_like(gc);
  check_launch(adaptmoe::launch_act_mul(gc.data_ptr(), uc.data_ptr(), dt, gc.numel(),
                                        static_cast<adaptmoe::Activation>(act), out.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream()),
               "act_mul");
  return out;
}

struct DecodeInputs {
  Tensor x, e, w1, w2, w3, b1, b2;
  std::optional<Tensor> w;
  int64_t T, D, E, H, O, K, N;
};

// Every check of decode_ffn, before any allocation or launch.
DecodeInputs checked_decode_inputs(const Tensor& x_TD, const Tensor& e_TK, const std::optional<Tensor>& w_TK,
                                   const Tensor& w1_EHD, const Tensor& w2_EHO, const std::optional<Tensor>& w3_EHD,
                                   const std::optional<Tensor>& b1_EH, const std::optional<Tensor>& b2_EO,
                                   int64_t act, int64_t splits, int64_t out_dtype) {
  check_rows(x_TD, "x_TD");
  TORCH_CHECK(w1_EHD.dim() == 3 && w2_EHO.dim() == 3, "adaptmoe: w1_EHD and w2_EHO must be 3-D");
  DecodeInputs in;
  in.T = x_TD.size(0), in.D = x_TD.size(1), in.E = w1_EHD.size(0), in.H = w1_EHD.size(1), in.O = w2_EHO.size(2);
  in.x = checked_weight(x_TD, x_TD, "x_TD", {in.T, in.D});
  in.w1 = checked_weight(w1_EHD, x_TD, "w1_EHD", {in.E, in.H, in.D});
  in.w2 = checked_weight(w2_EHO, x_TD, "w2_EHO", {in.E, in.H, in.O});
  in.w3 = checked_weight(w3_EHD, x_TD, "w3_EHD", {in.E, in.H, in.D});
  in.b1 = checked_weight(b1_EH, x_TD, "b1_EH", {in.E, in.H});
  in.b2 = checked_weight(b2_EO, x_TD, "b2_EO", {in.E, in.O});
  in.e = checked_slots(e_TK, x_TD);
  TORCH_CHECK(in.e.size(0) == in.T, text("adaptmoe: e_TK must have T=", in.T, " rows"));
  in.K = in.e.size(1), in.N = in.T * in.K;
  const int64_t max_pairs = adaptmoe::kMaxDecodePairs, max_experts = adaptmoe::kMaxDecodeExperts;
  TORCH_CHECK(in.N <= max_pairs, text("adaptmoe: decode takes at most ", max_pairs, " (token, expert) pairs, got ", in.N));
  TORCH_CHECK(in.E <= max_experts, text("adaptmoe: decode takes at most ", max_experts, " experts, got ", in.E));
  const int64_t pack = 16 / static_cast<int64_t>(x_TD.element_size());
  TORCH_CHECK(in.D % pack == 0 && in.H % pack == 0 && in.O % pack == 0, text("adaptmoe: decode needs D, H, O multiples of ",
              pack, ", got ", in.D, ", ", in.H, ", ", in.O));
  TORCH_CHECK(act >= adaptmoe::kActIdentity && act <= adaptmoe::kActSigmoid, text("adaptmoe: unknown activation code ", act));
  TORCH_CHECK(splits >= 0 && splits <= in.H, text("adaptmoe: splits must be 0 (the kernel picks) or in [1, H=", in.H,
              "], got ", splits));
  TORCH_CHECK(out_dtype >= adaptmoe::kFloat32 && out_dtype <= adaptmoe::kBFloat16, text("adaptmoe: unknown out_dtype code ",
              out_dtype));
  in.w = checked_tk(w_TK, in.e, x_TD, "w_TK");
  return in;
}

// y_TO[t] = sum_k w_TK[t,k] * ffn_{e_TK[t,k]}(x_TD[t]) (postscore), or sum_k ffn_e(w_TK[t,k] * x_TD[t]);
// experts outside [0, E) add nothing. Reads only the selected experts' weights; out_dtype: DType code.
Tensor decode_ffn(const Tensor& x_TD, const Tensor& e_TK, const std::optional<Tensor>& w_TK, bool postscore,
                  const Tensor& w1_EHD, const Tensor& w2_EHO, const std::optional<Tensor>& w3_EHD,
                  const std::optional<Tensor>& b1_EH, const std::optional<Tensor>& b2_EO, int64_t act,
                  int64_t splits, int64_t out_dtype, const std::optional<Tensor>& num_valid_tokens) {
  const DecodeInputs in = checked_decode_inputs(x_TD, e_TK, w_TK, w1_EHD, w2_EHO, w3_EHD, b1_EH, b2_EO, act, splits,
                                                out_dtype);
  Tensor num_valid;
  if (num_valid_tokens.has_value()) {
    check_cuda(*num_valid_tokens, "num_valid_tokens", x_TD);
    TORCH_CHECK(num_valid_tokens->numel() == 1 && num_valid_tokens->scalar_type() == at::kLong,
                "adaptmoe: num_valid_tokens must be one int64 element");
    num_valid = num_valid_tokens->contiguous();
  }
  const int64_t* valid_ptr = num_valid.defined() ? num_valid.data_ptr<int64_t>() : nullptr;
  const c10::cuda::CUDAGuard guard(x_TD.device());
  const auto dt = dtype_of(x_TD);
  const Tensor &x = in.x, &e = in.e, &w1 = in.w1, &w2 = in.w2, &w3 = in.w3, &b1 = in.b1, &b2 = in.b2;
  const auto& w = in.w;
  const int64_t T = in.T, D = in.D, E = in.E, H = in.H, O = in.O, K = in.K, N = in.N;
  const auto out_dt = static_cast<adaptmoe::DType>(out_dtype);
  const auto out_type = out_dt == adaptmoe::kFloat32 ? at::kFloat : out_dt == adaptmoe::kFloat16 ? at::kHalf : at::kBFloat16;
  // Room for the slices the kernel may pick, with the fp32 partials kept under 64 MiB.
  const int64_t memory_cap = std::max<int64_t>(1, (int64_t{64} << 20) / std::max<int64_t>(1, N * O * 4));
  const int64_t max_splits = splits > 0 ? splits : std::min<int64_t>({adaptmoe::decode_auto_max_splits(dt, O), memory_cap, H});
  auto stream = c10::cuda::getCurrentCUDAStream();
  Tensor h = at::empty({N, H}, x.options());
  Tensor part = at::empty({max_splits, N, O}, x.options().dtype(at::kFloat));
  Tensor splits_used = at::empty({1}, x.options().dtype(at::kInt));
  Tensor y = at::empty({T, O}, x.options().dtype(out_type));
  const void* w_ptr = w.has_value() ? w->data_ptr() : nullptr;
  const auto w_dt = w.has_value() ? dtype_of(*w) : adaptmoe::kFloat32;
  auto ptr = [](const Tensor& t) -> const void* { return t.defined() ? t.data_ptr() : nullptr; };
  check_launch(adaptmoe::launch_decode_up(x.data_ptr(), dt, e.data_ptr<int64_t>(), postscore ? nullptr : w_ptr, w_dt,
                                          w1.data_ptr(), ptr(w3), ptr(b1), N, static_cast<int>(K),
                                          static_cast<int>(E), H, D, static_cast<adaptmoe::Activation>(act),
                                          valid_ptr, h.data_ptr(), stream),
               "decode up projection");
  check_launch(adaptmoe::launch_decode_down(h.data_ptr(), dt, e.data_ptr<int64_t>(), w2.data_ptr(), N,
                                            static_cast<int>(K), static_cast<int>(E), H, O, static_cast<int>(splits),
                                            static_cast<int>(max_splits), valid_ptr, part.data_ptr<float>(),
                                            splits_used.data_ptr<int>(), stream),
               "decode down projection");
  check_launch(adaptmoe::launch_decode_reduce(part.data_ptr<float>(), e.data_ptr<int64_t>(), postscore ? w_ptr : nullptr,
                                              w_dt, ptr(b2), dt, T, static_cast<int>(K), static_cast<int>(E), O,
                                              splits_used.data_ptr<int>(), valid_ptr, y.data_ptr(), out_dt, stream),
               "decode reduce");
  return y;
}

// Launches the first registered Triton kernel of `ids` that computes right for these named
// arguments (runtime parameters and constexprs; pointers as integers) over `programs` programs on
// device's current stream: its id, or -1 with nothing enqueued when none fits. Python's launches of
// our Triton kernels go through here once a variant is registered (adaptmoe/ops/_triton_native.py):
// Triton's own launcher costs tens of us of host time per launch.
int64_t launch_registered_triton(const std::vector<int64_t>& ids, const std::vector<std::string>& names,
                                 const std::vector<int64_t>& values, int64_t programs, int64_t device) {
  TORCH_CHECK(names.size() == values.size(), "adaptmoe: one value per argument name");
  TORCH_CHECK(programs >= 0 && programs <= INT32_MAX, "adaptmoe: programs must fit in int32");
  adaptmoe::TritonArgs args;
  args.reserve(names.size());
  for (size_t i = 0; i < names.size(); ++i) args.emplace_back(names[i].c_str(), values[i]);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  for (int64_t id : ids) {
    if (!adaptmoe::triton_kernel_matches(id, args)) continue;
    check_launch(adaptmoe::launch_triton_kernel(id, args, static_cast<unsigned>(programs),
                                                c10::cuda::getCurrentCUDAStream()),
                 "Triton kernel");
    return id;
  }
  return -1;
}

}  // namespace adaptmoe::torch_ops

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace adaptmoe::torch_ops;
  m.doc() = "adaptmoe native CUDA kernels (gating/top-k, slot assignment, dispatch/combine rows, decode FFN)";
  m.def("gate_logits", &gate_logits, "x @ wg^T as the native forwards compute it (a kernel for few experts)");
  m.def("set_gate_kernel_enabled", &adaptmoe::forward_parts::set_gate_kernel_enabled,
        "off: the gate of few experts through at::mm too (an A/B switch)");
  m.def("route_topk", &route_topk, "fused scores + top-k + slot assignment");
  m.def("route_topk_backward", &route_topk_backward, "d loss / d logits of route_topk's weights and scores");
  m.def("gshard_loss_backward", &gshard_loss_backward, "d gshard_loss / d scores (rows not normalised)");
  m.def("gshard_loss", &gshard_loss, "GShard balance loss of scores and first choices (no autograd)");
  m.def("assign_slots", &assign_slots, "slot locations in GShard priority order");
  m.def("overflow_layout", &overflow_layout, "dropless routing in capacity slots, overflow rows in free slots");
  m.def("host_writable", &host_writable, "whether overflow_layout can write its count into this pinned tensor");
  m.def("overflow_fixup_share", &overflow_fixup_share, "a slot layout's fix-up rows per 1024 routed rows, into pinned memory");
  m.def("scatter_rows", &scatter_rows, "token rows -> expert-major rows (optional scale, optional dots)");
  m.def("scatter_located_rows", &scatter_located_rows, "dispatch of slot-assignment slots, rows to zero from counts");
  m.def("gather_rows", &gather_rows, "expert-major rows -> weighted sum per token (optional dots)");
  m.def("act_mul", &act_mul, "act(g) * u elementwise, one rounding");
  m.def("bmm_nt_act", &adaptmoe::bmm_nt_act, "act(x @ w^T + b) per expert, activation in cuBLASLt's epilogue");
  m.def("decode_ffn", &decode_ffn, "expert FFN of a few tokens over the selected experts only");
  m.def("moe_route_nograd", &adaptmoe::moe_route_nograd,
        "no-grad routing of a single-process layer plus the row -> choice map of a gathering first GEMM");
  m.def("moe_forward_nograd", &adaptmoe::moe_forward_nograd,
        "no-grad forward of a single-process layer: gate, routing, dispatch, FFN, combine in one call");
  m.def("moe_forward_nograd_gathered", &adaptmoe::moe_forward_nograd_gathered,
        "moe_forward_nograd for relu experts, the first GEMM a registered Triton kernel gathering its rows");
  m.def("moe_forward_nograd_slotted", &adaptmoe::moe_forward_nograd_slotted,
        "dropless moe_forward_nograd for relu experts in cf=1's capacity slots, overflow rows fixed up by Triton");
  m.def("slotted_bmm_forward", &adaptmoe::slotted_bmm_forward,
        "one GEMM of dropless training in capacity slots: batched GEMM + Triton fix-up of the overflow rows");
  m.def("slotted_bmm_backward", &adaptmoe::slotted_bmm_backward,
        "its backward: input gradient with its fix-up, weight gradient with the overflow rows' move");
  m.def("launch_registered_triton", &launch_registered_triton,
        "launches the first registered Triton kernel that fits these named arguments; its id or -1");
  m.def("register_triton_kernel", &adaptmoe::register_triton_kernel,
        "registers a compiled Triton kernel (function handle and specialization) for launches from C++; -1 if refused");
  m.attr("max_decode_pairs") = adaptmoe::kMaxDecodePairs;
  m.attr("max_topk_experts") = adaptmoe::kMaxTopkExperts;
  m.attr("max_gate_experts") = adaptmoe::kMaxGateExperts;
  m.attr("max_locate_experts") = adaptmoe::kMaxLocateExperts;
}
