// Launching a Triton kernel that Triton compiled and loaded (its CUfunction) from C++, so a native
// call can enqueue it between its own launches: the no-grad dropless forward's gathered first GEMM
// (adaptmoe/ops/_triton_gemm.py) was launched from Python between two native calls, and the GPU
// idled for that Python (~0.1-0.2 ms of host time per call on the H100 machines).
//
// Python registers a compiled kernel once (adaptmoe/ops/_triton_native.py): its function handle,
// launch shape and the specialization Triton compiled it for (the runtime parameters in order,
// with their kind and 16-divisibility, and the arguments Triton folded into constants). A launch
// passes arguments by name; it happens only when the kernel computes right for them (its
// divisibility assumptions hold, its folded constants are theirs), else the caller takes
// Triton's own launcher, which compiles or picks a variant for them.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace adaptmoe {

enum TritonParamKind : int64_t { kTritonPtr = 0, kTritonI32 = 1, kTritonI64 = 2 };

using TritonArgs = std::vector<std::pair<const char*, int64_t>>;   // name -> value (pointers as integers)

// Returns the id of the registered kernel. num_warps: Triton's; shared_bytes: its dynamic shared
// memory (the handle already allows it: Triton set the attribute when it loaded the kernel).
int64_t register_triton_kernel(int64_t function, int64_t num_warps, int64_t shared_bytes,
                               std::vector<std::string> param_names, std::vector<int64_t> param_kinds,
                               std::vector<bool> param_div16, std::vector<std::string> const_names,
                               std::vector<int64_t> const_values);

// Whether kernel `id` computes right for these argument values: every runtime parameter compiled
// as a multiple of 16 is one (and fits its int kind), every folded argument that `args` names has
// its value.
bool triton_kernel_matches(int64_t id, const TritonArgs& args);

// A folded (constexpr) argument of kernel `id`, e.g. a tile size; `fallback` when absent.
int64_t triton_kernel_constant(int64_t id, const char* name, int64_t fallback);

// Enqueues kernel `id` on `stream` over (grid, 1, 1) programs; the caller checked the match.
cudaError_t launch_triton_kernel(int64_t id, const TritonArgs& args, unsigned grid, cudaStream_t stream);

}  // namespace adaptmoe
