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

// Ints of workspace launch_locate needs.
int64_t locate_workspace_ints(int64_t T, int E, int K);

// Slot locations in GShard priority order (every choice 0 in token order, then every choice 1,
// ...): locations_TK = rank of (t, k) among its expert's assignments, counts_E (int64) =
// assignments per expert, slots_TK = e*C + loc when loc < C (else -1) for capacity >= 0, or
// offsets_E[e] + loc (expert-major dropless rows) for capacity < 0. Out-of-range experts get -1.
cudaError_t launch_locate(const int64_t* indices_TK, int64_t T, int E, int K, int64_t capacity,
                          int* workspace, int64_t* locations_TK, int64_t* counts_E,
                          int64_t* slots_TK, cudaStream_t stream);

// out_RD[slots[t,k]] = src_TD[t] * w[t,k] (w null: 1) for kept slots; rows no slot names are 0.
// dot_out (may be null) [t,k] = <src_TD[t], dot_RD[slots[t,k]]> (0 for dropped), in dot_dt.
// workspace: R ints (the inverse slot map; one block per output row, rows written in order).
cudaError_t launch_scatter_rows(const void* src_TD, DType dt, const int64_t* slots_TK,
                                const void* w_TK, DType w_dt, const void* dot_RD, int64_t T, int K,
                                int64_t D, int64_t R, int* workspace, void* out_RD,
                                void* dot_out_TK, DType dot_dt, cudaStream_t stream);

// out_TD[t] = sum_k w[t,k] * src_RD[slots[t,k]] over kept slots (fp32 accumulation); slots
// outside [0, R) count as dropped.
// dot_out (may be null) [t,k] = <dot_TD[t], src_RD[slots[t,k]]> (0 for dropped), in dot_dt.
cudaError_t launch_gather_rows(const void* src_RD, DType dt, const int64_t* slots_TK,
                               const void* w_TK, DType w_dt, const void* dot_TD, int64_t T, int K,
                               int64_t D, int64_t R, void* out_TD, void* dot_out_TK, DType dot_dt,
                               cudaStream_t stream);

}  // namespace adaptmoe
