// Pieces of the one-call no-grad forwards shared by layer_forward.cpp (padded, grouped and dense
// layouts) and gathered_forward.cpp (first GEMMs that gather their rows): the gate, the routing
// buffer, the combine, the outputs and the argument checks. Defined in layer_forward.cpp.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "moe_kernels.h"
#include "torch_ops.h"

namespace adaptmoe::forward_parts {

using at::Tensor;
using torch_ops::alias;

struct ExpertWeights {
  Tensor w1, w2, w3, b1, b2;   // w3, b1, b2 undefined when absent
};

inline Tensor value_or_undefined(const std::optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }

// logits_TE = x_TD @ wg_ED^T (float32 operands when gate_fp32, else x in wg's dtype); a gate of
// few experts (launch_gate serves it) through that kernel, else at::mm (F.linear's bits).
Tensor gate_logits(const Tensor& x_TD, const Tensor& wg_ED, bool gate_fp32);

// Turns the gate kernel off (at::mm for every gate) or back on, e.g. to compare the two.
void set_gate_kernel_enabled(bool enabled);

// t.view(sizes) for a contiguous t, without the dispatcher (see torch_ops::alias).
Tensor viewed(const Tensor& t, at::IntArrayRef sizes);

// Routing results and the slot assignment's workspace live in one byte buffer (one allocation
// in front of the dispatch instead of three: each cost ~3.5 us of host time on the H100 machine,
// ~3x that at the start of a call on an idle GPU): int64 indices, locations, slots and counts,
// then scores and weights in the logits' dtype, then the int32 workspace. The launches take raw
// pointers; typed tensor views are made only when needed, mostly after the FFN is enqueued
// (each view costs dispatcher calls and no kernel needs them).
struct Routed {
  int64_t T = 0, k = 0, E = 0;
  Tensor buf, x_RD;
  at::ScalarType vals_type = at::kFloat;
  int64_t ints_bytes() const { return (3 * T * k + E) * 8; }
  int64_t vals_bytes() const { return (T * E + T * k) * static_cast<int64_t>(c10::elementSize(vals_type)); }
  int64_t workspace_offset() const { return ints_bytes() + (vals_bytes() + 7) / 8 * 8; }
  int64_t* indices() const { return reinterpret_cast<int64_t*>(buf.data_ptr()); }
  int64_t* locations() const { return indices() + T * k; }
  int64_t* slots() const { return indices() + 2 * T * k; }
  int64_t* counts() const { return indices() + 3 * T * k; }
  void* scores() const { return static_cast<char*>(buf.data_ptr()) + ints_bytes(); }
  void* weights() const { return static_cast<char*>(scores()) + T * E * c10::elementSize(vals_type); }
  int* workspace() const { return reinterpret_cast<int*>(static_cast<char*>(buf.data_ptr()) + workspace_offset()); }
  DType vals_dtype() const { return vals_type == at::kFloat ? kFloat32 : vals_type == at::kHalf ? kFloat16 : kBFloat16; }
  Tensor counts_E() const { return alias(buf, at::kLong, 3 * T * k * 8, {E}); }
  // (indices_TK, weights_TK, scores_TE, locations_TK, counts_E, slots_TK)
  std::vector<Tensor> views() const {
    const int64_t n = T * k, ints = ints_bytes(), val = static_cast<int64_t>(c10::elementSize(vals_type));
    return {alias(buf, at::kLong, 0, {T, k}), alias(buf, vals_type, ints + T * E * val, {T, k}),
            alias(buf, vals_type, ints, {T, E}), alias(buf, at::kLong, n * 8, {T, k}), counts_E(),
            alias(buf, at::kLong, 2 * n * 8, {T, k})};
  }
};

// The routing buffer of T tokens over E experts, logits (and so scores, weights) in vals_type.
Routed alloc_routed(int64_t T, int64_t E, int64_t k, at::ScalarType vals_type, const at::TensorOptions& options);

// Scores + top-k + slot assignment (capacity < 0: dropless) into r.
void launch_routing(const Routed& r, const Tensor& logits_TE, int64_t score_fn, bool normalize, int64_t capacity);

// alloc_routed + launch_routing.
Routed route(const Tensor& logits_TE, int64_t k, int64_t score_fn, bool normalize, int64_t capacity);

// The routing buffer for the logits of this gate (float32 when gate_fp32, else wg's dtype).
Routed alloc_routed_for(const Tensor& x_TD, const Tensor& wg_ED, bool gate_fp32, int64_t k);

// gate_logits + launch_routing into r, returning the logits; a gate of few experts computes its
// logits and top-k in one launch (launch_gate). tm_slots (may be null): also the dense layout's
// token-major rows, indices * T + t.
Tensor gate_and_route(const Routed& r, const Tensor& x_TD, const Tensor& wg_ED, bool gate_fp32, int64_t score_fn,
                      bool normalize, int64_t capacity, int64_t* tm_slots = nullptr);

// y_TO[t] = sum_k w[t,k] * y_RO[slots[t,k]] (w absent: 1); slots: r.slots() unless given.
Tensor combine(const Tensor& y_RO, const Routed& r, bool postscore, const int64_t* slots = nullptr);

// (y_TO, logits_TE, r's views, gshard loss or undefined): what the native forwards return.
std::vector<Tensor> forward_outputs(const Tensor& y_TO, const Tensor& logits_TE, const Routed& r, bool want_gshard_loss,
                                    int64_t score_fn);

// Tokens (2-D, CUDA) and the gate's weight, what every native forward starts from.
void check_gate_inputs(const Tensor& x_TD, const Tensor& wg_ED);

// check_gate_inputs and the experts' weights against the layout asked for.
void check_inputs(const Tensor& x_TD, const Tensor& wg_ED, int64_t k, int64_t capacity, bool grouped, bool dense,
                  bool postscore, const ExpertWeights& w, bool relu_epilogue);

}  // namespace adaptmoe::forward_parts
