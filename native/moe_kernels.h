// adaptmoe native kernels: plain CUDA, no torch headers (bindings.cpp is the only torch-facing file).
//
// Legend: T tokens, E experts, K top-k, D model dim, R rows of the expert-major buffer.
// Every launcher runs on the given stream, returns the first CUDA error it meets and never
// synchronizes with the host. Index tensors are int64 (what adaptmoe.routing produces).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace adaptmoe {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum ScoreFn : int { kSoftmax = 0, kSigmoid = 1 };

// Largest expert count of the fused top-k (one warp per token, E/32 scores per lane).
constexpr int kMaxTopkExperts = 1024;
// Largest expert count of the slot assignment (shared memory holds a few ints per expert).
constexpr int kMaxLocateExperts = 2048;
// Tokens per chunk of the slot assignment (one thread per token).
constexpr int kLocateChunk = 128;

// Scores (softmax or sigmoid over E, in fp32), top-k by score (ties: lower expert first),
// optional renormalisation of the k weights. indices_TK int64; weights_TK and scores_TE (may be
// null) in the logits dtype; weights in descending score order like torch.topk.
cudaError_t launch_topk(const void* logits_TE, DType dt, int64_t T, int E, int K, ScoreFn fn,
                        bool normalize, int64_t* indices_TK, void* weights_TK, void* scores_TE,
                        cudaStream_t stream);

// Largest expert count of the gate kernel below (a lane's accumulators hold every expert), and
// the largest gate weight it takes (staged in shared memory without an opt-in); others: cuBLAS.
constexpr int kMaxGateExperts = 8;
constexpr int64_t kMaxGateWeightBytes = 48 * 1024;

// Whether launch_gate takes x and wg of these dtypes, E experts and D features (gate_kernels.cu):
// the same dtype, E <= kMaxGateExperts, E * D elements within kMaxGateWeightBytes.
bool gate_kernel_serves(DType x_dt, DType wg_dt, int64_t E, int64_t D);

// logits_TE = x_TD @ wg_ED^T (both contiguous, dtype dt, fp32 products and sums; logits in dt, or
// fp32 when logits_fp32), the same bits for a token whatever the other tokens or x's alignment.
// K > 0: fused with launch_topk's scores and top-k on the rounded logits (same outputs), plus
// tm_slots_TK[t, r] = indices_TK[t, r] * T + t when not null (the dense layout's rows).
cudaError_t launch_gate(const void* x_TD, const void* wg_ED, DType dt, bool logits_fp32, int64_t T, int64_t D, int E,
                        void* logits_TE, int K, ScoreFn fn, bool normalize, int64_t* indices_TK, void* weights_TK,
                        void* scores_TE, int64_t* tm_slots_TK, cudaStream_t stream);

// d loss / d logits_TE of launch_topk's weights_TK and scores_TE (gating_backward.cu): scores
// recomputed as launch_topk computes them, grad_w_TK and grad_scores_TE (either may be null: no
// gradient) in the logits dtype, the weights' renormalisation differentiated when `normalize`
// (its sum clamped at FLT_MIN), fp32 inside. grad_logits_TE in the logits dtype.
cudaError_t launch_topk_backward(const void* logits_TE, DType dt, const int64_t* indices_TK, const void* grad_w_TK,
                                 const void* grad_scores_TE, int64_t T, int E, int K, ScoreFn fn, bool normalize,
                                 void* grad_logits_TE, cudaStream_t stream);

// d loss / d scores_TE of launch_gshard_loss (rows not normalised): grad (one device float, the
// loss's gradient) * E * (tokens whose first choice indices_TK[t, 0] is e) / T^2 in every row, in
// dtype dt (gating_backward.cu).
cudaError_t launch_gshard_loss_backward(const int64_t* indices_TK, int64_t T, int E, int K, const float* grad,
                                        DType dt, void* grad_scores_TE, cudaStream_t stream);

// Ints of workspace launch_locate needs.
int64_t locate_workspace_ints(int64_t T, int E, int K);

// Slot locations in GShard priority order (every choice 0 in token order, then every choice 1,
// ...): locations_TK = rank of (t, k) among its expert's assignments, counts_E (int64) =
// assignments per expert, slots_TK = e*C + loc when loc < C (else -1) for capacity >= 0, or
// offsets_E[e] + loc (expert-major dropless rows) for capacity < 0. Out-of-range experts get -1.
cudaError_t launch_locate(const int64_t* indices_TK, int64_t T, int E, int K, int64_t capacity,
                          int* workspace, int64_t* locations_TK, int64_t* counts_E,
                          int64_t* slots_TK, cudaStream_t stream);

// A dropless routing (launch_locate with capacity < 0: locations_TK, counts_E) laid out in
// `capacity` slots per expert, E * capacity >= T*K (slot_layout.cu): choice (t, k) of expert e at
// location loc < capacity takes slot e*capacity + loc; the others ("overflow", row g in order of
// expert then location) take the g-th slot other experts leave free, in slot order. The same
// slots as adaptmoe.routing.overflow_slots. Writes slots_TK, rows_O[g] (its slot) and
// choice_O[g] (its choice t*K + k) for the overflow rows, over_E (overflow rows per expert),
// hosted_E (overflow rows in each expert's free slots) and touched (one int64: experts with
// overflow rows plus experts hosting some), capacity_E (= capacity for every expert: the padded
// GEMM's rows per expert) and inv_S[slot] = choice for every fed slot (others untouched).
// choice_O, capacity_E and inv_S may be null (not written); hosted_E and touched both or neither.
// A choice whose expert or location does not fit the counts (not the routing they came from) gets
// slot -1 and nothing else written, never an out-of-range write.
// touched_host (may be null): a device pointer to mapped host memory that gets touched too, for a
// host that reads it without a copy or an event.
cudaError_t launch_overflow_layout(const int64_t* indices_TK, const int64_t* locations_TK, const int64_t* counts_E,
                                   int64_t T, int E, int K, int64_t capacity, int64_t* slots_TK, int64_t* rows_O,
                                   int64_t* choice_O, int64_t* over_E, int64_t* hosted_E, int64_t* touched,
                                   int64_t* touched_host, int64_t* capacity_E, int* inv_S, cudaStream_t stream);

// *share = (rows a slot layout's fix-ups compute for these counts: each expert's overflow past
// `capacity` rounded up to row_tile) * 1024 / n, n the routed rows (0 when n == 0). share may be
// a device pointer to mapped host memory (a host that reads it without a copy or an event).
cudaError_t launch_overflow_fixup_share(const int64_t* counts_E, int E, int64_t capacity, int64_t row_tile, int64_t n,
                                        int64_t* share, cudaStream_t stream);

// GShard balance loss of a no-grad call, in two launches (partial sums, then the scalar):
// loss = E * sum_e mean_t(p_te) * (tokens whose first choice is e) / T, with p = scores_TE (rows
// divided by their sum, clamped at 1e-9, when normalize_rows: sigmoid scores), indices_TK[:, 0] the
// first choices, fp32 sums in a fixed order (the same inputs give the same bits); 0 when T == 0.
// workspace: gshard_loss_workspace_floats(T, E) floats; loss: one float.
int64_t gshard_loss_workspace_floats(int64_t T, int E);
cudaError_t launch_gshard_loss(const void* scores_TE, DType dt, const int64_t* indices_TK, int64_t T, int E, int K,
                               bool normalize_rows, float* workspace, float* loss, cudaStream_t stream);

// out_RD[slots[t,k]] = src_TD[t] * w[t,k] (w null: 1) for kept slots; rows no slot names are 0.
// dot_out (may be null) [t,k] = <src_TD[t], dot_RD[slots[t,k]]> (0 for dropped), in dot_dt.
// workspace: R ints (the inverse slot map, used to zero the rows no choice feeds).
cudaError_t launch_scatter_rows(const void* src_TD, DType dt, const int64_t* slots_TK,
                                const void* w_TK, DType w_dt, const void* dot_RD, int64_t T, int K,
                                int64_t D, int64_t R, int* workspace, void* out_RD,
                                void* dot_out_TK, DType dot_dt, cudaStream_t stream);

// launch_scatter_rows for slots made by launch_locate: expert e's kept choices fill rows
// e*C + [0, min(counts_E[e], C)) when capacity C >= 0 (the rest of its C rows become 0, found from
// counts_E, when zero_unfed; else they are left unwritten), every one of the T*K rows when
// capacity < 0. No inverse map, no workspace: two launches fewer than launch_scatter_rows (the
// no-grad layer forward's dispatch, which never reads the outputs of unfed rows).
cudaError_t launch_scatter_located_rows(const void* src_TD, DType dt, const int64_t* slots_TK, const void* w_TK,
                                        DType w_dt, int64_t T, int K, int64_t D, int64_t capacity,
                                        const int64_t* counts_E, int64_t E, bool zero_unfed, void* out_RD,
                                        cudaStream_t stream);

// inv_R[slots[i]] = i for the n = T*K choices whose slot is in [0, R) (other entries untouched):
// the grouped row -> (token, choice) map of a dropless routing, where every row is fed. fill_E
// (may be null): also set to fill_value in its E entries (the padded layout's rows per expert, in
// the same launch instead of an ATen fill in front of the first GEMM).
cudaError_t launch_inverse_slots(const int64_t* slots_TK, int64_t n, int64_t R, int* inv_R, cudaStream_t stream,
                                 int64_t* fill_E = nullptr, int64_t E = 0, int64_t fill_value = 0);

// slots_TK[t,k] = indices_TK[t,k] * T + t (-1 for an index outside [0, E)): the rows of choice
// (t, k) in a buffer that holds every token once per expert, expert-major ([E, T, ...]).
cudaError_t launch_token_major_slots(const int64_t* indices_TK, int64_t T, int K, int E, int64_t* slots_TK,
                                     cudaStream_t stream);

// out_TD[t] = sum_k w[t,k] * src_RD[slots[t,k]] over kept slots (fp32 accumulation); slots
// outside [0, R) count as dropped.
// dot_out (may be null) [t,k] = <dot_TD[t], src_RD[slots[t,k]]> (0 for dropped), in dot_dt.
cudaError_t launch_gather_rows(const void* src_RD, DType dt, const int64_t* slots_TK,
                               const void* w_TK, DType w_dt, const void* dot_TD, int64_t T, int K,
                               int64_t D, int64_t R, void* out_TD, void* dot_out_TK, DType dot_dt,
                               cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Decode (few tokens): each kernel reads only the weights of experts some (t, k) pair selected;
// blocks of unselected experts return at once. N = T*K pairs, pair n is token n / K; an expert
// index outside [0, E) (a padded token) selects nothing. D, H, O are multiples of 16 bytes of the
// weights' dtype and every pointer is 16-byte aligned (the bindings check both). num_valid
// (device int64, may be null): only the first *num_valid tokens are real; the rest select nothing
// and their outputs are zeros (padded CUDA-graph buckets).
enum Activation : int { kActIdentity = 0, kActRelu = 1, kActGelu = 2, kActGeluTanh = 3, kActSilu = 4, kActTanh = 5, kActSigmoid = 6 };

// out[i] = act(g[i]) * u[i] (the gated FFN's product) with one rounding; g, u, out of dtype dt,
// 16-byte aligned. Replaces an activation pass and a multiply pass over [rows, H].
cudaError_t launch_act_mul(const void* g, const void* u, DType dt, int64_t n, Activation act, void* out,
                           cudaStream_t stream);

// Largest N of the decode kernels (each block keeps pair and expert lists in shared memory).
constexpr int kMaxDecodePairs = 1024;
// Largest expert count of the decode kernels (a bitmask of selected experts in shared memory).
constexpr int kMaxDecodeExperts = 8192;

// The decode kernels run one resident wave of blocks that first find the experts some pair
// selected (A of them) and then share that work out evenly, so the launch never depends on
// routing (nothing waits for the host) and no block sits in a second, mostly idle wave.

// h_NH[n] = act(s_n * x_TD[n / K] . w1[e_n]^T + b1[e_n]) (* s_n * x_TD[n / K] . w3[e_n]^T when w3
// is given); s_n = scale_N[n] (scale_N null: 1). x, w1, w3, b1 and h share dtype dt; scale_N in
// scale_dt. Rows of h for pairs that select nothing are left unwritten.
cudaError_t launch_decode_up(const void* x_TD, DType dt, const int64_t* e_N, const void* scale_N,
                             DType scale_dt, const void* w1_EHD, const void* w3_EHD, const void* b1_EH,
                             int64_t N, int K, int E, int64_t H, int64_t D, Activation act,
                             const int64_t* num_valid, void* h_NH, cudaStream_t stream);

// Most hidden slices the down projection may cut H into when the kernel chooses (splits = 0):
// part_SNO must have room for that many slices.
int decode_auto_max_splits(DType dt, int64_t O);

// part_SNO[s, n] = fp32 partial h_NH[n] . w2[e_n][hidden slice s of S]; splits > 0 forces
// S = splits, splits = 0 lets the kernel pick S from A so that every resident block gets one
// (expert, column block, slice); S is stored in *splits_out for the reduce. Rows of pairs that
// select nothing are left unwritten.
cudaError_t launch_decode_down(const void* h_NH, DType dt, const int64_t* e_N, const void* w2_EHO,
                               int64_t N, int K, int E, int64_t H, int64_t O, int splits, int max_splits,
                               const int64_t* num_valid, float* part_SNO, int* splits_out, cudaStream_t stream);

// y_TO[t] = sum_k w_n * (sum_{s < S} part_SNO[s, n] + b2[e_n]) over the pairs n = t*K + k that
// select an expert (w_N null: 1; b2 null: 0; b2 in dt), S = *splits_in, fp32 sums in a fixed
// order (bitwise reproducible), stored in out_dt.
cudaError_t launch_decode_reduce(const float* part_SNO, const int64_t* e_N, const void* w_N, DType w_dt,
                                 const void* b2_EO, DType dt, int64_t T, int K, int E, int64_t O,
                                 const int* splits_in, const int64_t* num_valid, void* y_TO, DType out_dt,
                                 cudaStream_t stream);

}  // namespace adaptmoe
