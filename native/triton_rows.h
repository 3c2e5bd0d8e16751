// Launches of the Triton kernels of adaptmoe/ops/_triton_gemm.py from C++ (triton_launch.h), with
// the arguments their Python launchers pass: the row GEMM (_grouped_rows_kernel, as
// _launch_grouped_rows) and the weight-gradient move (_ragged_k_move_kernel, as ragged_k_move).
// A launch goes to the first registered variant whose specialization its arguments satisfy.
#pragma once
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "torch_ops.h"
#include "triton_launch.h"

namespace adaptmoe {

enum RowsScatter : int64_t { kScatterNone = 0, kScatterGathered = 1, kScatterIndexed = 2 };
enum RowsEpilogue : int64_t { kEpilogueNone = 0, kEpilogueRelu = 1 };

// One launch of ops/_triton_gemm.py's _grouped_rows_kernel, with the arguments
// _launch_grouped_rows passes (its unused pointers: a). gather_len: the gather index's length
// there (the program count derives from it).
struct RowsGemm {
  const void *a, *gather, *scatter, *b, *bias, *c;
  const int64_t* counts;
  int64_t E, top_k, KD, N, gather_len;
  bool transpose_b;
  int64_t scatter_mode, epilogue;
};

inline int64_t rows_programs(int64_t kernel_id, const RowsGemm& g) {
  const int64_t bm = triton_kernel_constant(kernel_id, "BM", 128),
                n_tiles = triton_kernel_constant(kernel_id, "N_TILES", 1);
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return std::min(sms, ((g.gather_len + bm - 1) / bm + g.E) * n_tiles);
}

inline TritonArgs rows_args(const RowsGemm& g, int64_t programs) {
  auto ptr = [&g](const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p ? p : g.a)); };
  return {{"a_ptr", ptr(g.a)}, {"gather_ptr", ptr(g.gather)}, {"scatter_ptr", ptr(g.scatter)},
          {"b_ptr", ptr(g.b)}, {"bias_ptr", ptr(g.bias)}, {"mask_ptr", ptr(nullptr)}, {"c_ptr", ptr(g.c)},
          {"counts_ptr", ptr(g.counts)}, {"E", g.E}, {"TOP_K", g.top_k}, {"KD", g.KD}, {"N", g.N},
          {"stride_be", g.KD * g.N}, {"stride_bk", g.transpose_b ? 1 : g.N}, {"stride_bn", g.transpose_b ? g.KD : 1},
          {"PROGRAMS", programs}, {"GATHER", g.gather ? 1 : 0}, {"SCATTER", g.scatter_mode},
          {"HAS_BIAS", g.bias ? 1 : 0}, {"EPILOGUE", g.epilogue}};
}

struct RowsLaunch {
  int64_t id = -1, programs = 0;
  TritonArgs args;
  void enqueue(const char* what) const {
    torch_ops::check_launch(launch_triton_kernel(id, args, static_cast<unsigned>(programs),
                                                 c10::cuda::getCurrentCUDAStream()),
                            what);
  }
};

// The first registered variant whose specialization this launch's arguments satisfy (id -1: none).
inline RowsLaunch first_fitting(const std::vector<int64_t>& ids, const RowsGemm& g) {
  for (int64_t id : ids) {
    RowsLaunch launch{id, rows_programs(id, g), {}};
    launch.args = rows_args(g, launch.programs);
    if (triton_kernel_matches(id, launch.args)) return launch;
  }
  return {};
}

// The row kernel over a slot layout's overflow rows (rows_O[g], over_E rows per true expert; only
// the first `rows` entries of rows_O are read): each row read from its slot of a and written back
// to the same slot of c, computed with its own expert's weights (and bias).
inline RowsGemm slot_fixup(const void* a, const void* w, const void* bias, const void* c, const int64_t* rows_O,
                           const int64_t* over_E, int64_t rows, int64_t E, int64_t KD, int64_t N, bool transpose_w,
                           int64_t epilogue) {
  return {a, rows_O, nullptr, w, bias, c, over_E, E, 1, KD, N, rows, transpose_w, kScatterGathered, epilogue};
}

// One launch of _ragged_k_move_kernel: c[e] -= a[rows removed]^T b[same], c[e] += a[rows added]^T b.
struct MoveGemm {
  const void *a, *b, *c, *remove, *add, *gather;
  int64_t E, P, Q;
};

inline RowsLaunch first_fitting(const std::vector<int64_t>& ids, const MoveGemm& g) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto ptr = [](const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); };
  for (int64_t id : ids) {
    const int64_t bp = triton_kernel_constant(id, "BP", 128), bq = triton_kernel_constant(id, "BQ", 256);
    RowsLaunch launch{id, std::min(sms, 2 * g.E * (g.P / bp) * (g.Q / bq)), {}};
    launch.args = {{"a_ptr", ptr(g.a)}, {"b_ptr", ptr(g.b)}, {"c_ptr", ptr(g.c)}, {"remove_ptr", ptr(g.remove)},
                   {"add_ptr", ptr(g.add)}, {"gather_ptr", ptr(g.gather)}, {"E", g.E}, {"P", g.P}, {"Q", g.Q},
                   {"PROGRAMS", launch.programs}};
    if (triton_kernel_matches(id, launch.args)) return launch;
  }
  return {};
}

}  // namespace adaptmoe
