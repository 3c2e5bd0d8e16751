// adaptmoe native kernels: a dropless routing laid out in capacity slots (launch_overflow_layout).
// Plain CUDA translation unit (no torch headers): `nvcc -arch=sm_90 -c slot_layout.cu` checks it.
//
// Legend: T tokens, E experts, K top-k, N = T*K choices, C slots per expert, S = E*C slot rows,
// O overflow rows (choices at or past their expert's C-th).
#include "moe_kernels.h"

#include <cub/block/block_scan.cuh>

#include <cstdint>

namespace adaptmoe {
namespace {

constexpr int kLayoutThreads = 256;

// hosted_E[e] = overflow rows placed in expert e's free slots (they fill the free slots in slot
// order), touched = experts with overflow rows plus experts hosting some: what the training path's
// fix-ups cost grows with (adaptmoe/ops/_triton_slotted.py). One block; total_over: all overflow rows.
__device__ void write_hosted(const int* s_count, const int* s_free_end, int E, int64_t C, int total_over,
                             int64_t* __restrict__ hosted_E, int64_t* __restrict__ touched,
                             volatile int64_t* touched_host) {
  __shared__ int s_touched;
  if (threadIdx.x == 0) s_touched = 0;
  __syncthreads();
  int mine = 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int free_slots = max(static_cast<int>(C) - s_count[e], 0);
    const int hosted = min(max(total_over - (s_free_end[e] - free_slots), 0), free_slots);
    hosted_E[e] = hosted;
    mine += (hosted > 0) + (s_count[e] > C);
  }
  atomicAdd(&s_touched, mine);
  __syncthreads();
  if (threadIdx.x == 0) {
    *touched = s_touched;
    if (touched_host != nullptr) *touched_host = s_touched;
  }
}

// Every block derives the same per-expert prefix sums from the counts (E is small next to N, and
// a second launch for them would cost more than the redundant scans), then places one choice per
// thread. Shared: counts, first overflow index of each expert, end of each expert's free slots.
__global__ void overflow_layout_kernel(const int64_t* __restrict__ indices, const int64_t* __restrict__ locations,
                                       const int64_t* __restrict__ counts, int64_t n, int E, int64_t C,
                                       int64_t* __restrict__ slots, int64_t* __restrict__ rows_O,
                                       int64_t* __restrict__ choice_O, int64_t* __restrict__ over_E,
                                       int64_t* __restrict__ hosted_E, int64_t* __restrict__ touched,
                                       int64_t* touched_host, int64_t* __restrict__ capacity_E,
                                       int* __restrict__ inv_S) {
  extern __shared__ int s_layout[];
  int* s_count = s_layout;            // E
  int* s_over_start = s_count + E;    // E: overflow index of expert e's first overflow row
  int* s_free_end = s_over_start + E; // E: free slots of experts 0..e (inclusive)
  using Scan = cub::BlockScan<int, kLayoutThreads>;
  __shared__ typename Scan::TempStorage tmp;
  int over_carry = 0, free_carry = 0;
  for (int b = 0; b < E; b += kLayoutThreads) {
    const int e = b + threadIdx.x;
    const int count = e < E ? static_cast<int>(counts[e]) : 0;
    const int over = e < E ? max(count - static_cast<int>(C), 0) : 0;
    const int free_slots = e < E ? max(static_cast<int>(C) - count, 0) : 0;
    int over_excl, over_total, free_incl, free_total;
    Scan(tmp).ExclusiveSum(over, over_excl, over_total);
    __syncthreads();
    Scan(tmp).InclusiveSum(free_slots, free_incl, free_total);
    if (e < E) {
      s_count[e] = count;
      s_over_start[e] = over_carry + over_excl;
      s_free_end[e] = free_carry + free_incl;
      if (blockIdx.x == 0) {
        over_E[e] = over;
        if (capacity_E != nullptr) capacity_E[e] = C;
      }
    }
    over_carry += over_total;
    free_carry += free_total;
    __syncthreads();
  }
  if (blockIdx.x == 0 && hosted_E != nullptr) {
    write_hosted(s_count, s_free_end, E, C, over_carry, hosted_E, touched, touched_host);
  }
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t e64 = indices[i], loc = locations[i];
  if (e64 < 0 || e64 >= E || loc < 0 || loc >= s_count[e64]) {   // not a routing these counts came from
    slots[i] = -1;
    return;
  }
  const int e = static_cast<int>(e64);
  int64_t slot;
  if (loc < C) {
    slot = static_cast<int64_t>(e) * C + loc;
  } else {
    // overflow row g takes the g-th free slot in slot order: its host is the first expert whose
    // free slots end past g (binary search over the non-decreasing ends)
    const int g = s_over_start[e] + static_cast<int>(loc - C);
    if (g >= s_free_end[E - 1]) {   // no free slot left: counts summing past E*C, not a routing's
      slots[i] = -1;
      return;
    }
    int lo = 0, hi = E;
    while (lo < hi) {
      const int mid = (lo + hi) / 2;
      if (s_free_end[mid] <= g) lo = mid + 1; else hi = mid;
    }
    const int host = min(lo, E - 1);
    const int host_free = max(static_cast<int>(C) - s_count[host], 0);
    slot = static_cast<int64_t>(host) * C + s_count[host] + (g - (s_free_end[host] - host_free));
    rows_O[g] = slot;
    if (choice_O != nullptr) choice_O[g] = i;
  }
  slots[i] = slot;
  if (inv_S != nullptr) inv_S[slot] = static_cast<int>(i);
}

// share[0] = (rows the fix-ups of a slot layout of these counts compute, each expert's overflow
// rounded up to the row kernel's row_tile) * 1024 / n: what laying out in slots adds to the expert
// GEMMs, per 1024 rows. One block.
__global__ void overflow_fixup_share_kernel(const int64_t* __restrict__ counts, int E, int64_t C, int64_t row_tile,
                                            int64_t n, volatile int64_t* share) {
  __shared__ unsigned long long s_rows;
  if (threadIdx.x == 0) s_rows = 0;
  __syncthreads();
  unsigned long long mine = 0;
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int64_t over = counts[e] > C ? counts[e] - C : 0;
    mine += static_cast<unsigned long long>((over + row_tile - 1) / row_tile * row_tile);
  }
  atomicAdd(&s_rows, mine);
  __syncthreads();
  if (threadIdx.x == 0) *share = n > 0 ? static_cast<int64_t>(s_rows * 1024 / static_cast<unsigned long long>(n)) : 0;
}

}  // namespace

cudaError_t launch_overflow_fixup_share(const int64_t* counts_E, int E, int64_t capacity, int64_t row_tile, int64_t n,
                                        int64_t* share, cudaStream_t stream) {
  if (E < 1 || capacity < 0 || row_tile < 1 || n < 0) return cudaErrorInvalidValue;
  overflow_fixup_share_kernel<<<1, kLayoutThreads, 0, stream>>>(counts_E, E, capacity, row_tile, n, share);
  return cudaGetLastError();
}

cudaError_t launch_overflow_layout(const int64_t* indices_TK, const int64_t* locations_TK, const int64_t* counts_E,
                                   int64_t T, int E, int K, int64_t capacity, int64_t* slots_TK, int64_t* rows_O,
                                   int64_t* choice_O, int64_t* over_E, int64_t* hosted_E, int64_t* touched,
                                   int64_t* touched_host, int64_t* capacity_E, int* inv_S, cudaStream_t stream) {
  const int64_t n = T * K;
  if (E < 1 || E > kMaxLocateExperts || K < 1 || capacity < 0 || static_cast<int64_t>(E) * capacity < n ||
      static_cast<int64_t>(E) * capacity >= INT32_MAX || (hosted_E == nullptr) != (touched == nullptr)) {
    return cudaErrorInvalidValue;
  }
  const unsigned blocks = static_cast<unsigned>(n > 0 ? (n + kLayoutThreads - 1) / kLayoutThreads : 1);
  overflow_layout_kernel<<<blocks, kLayoutThreads, 3 * sizeof(int) * E, stream>>>(
      indices_TK, locations_TK, counts_E, n, E, capacity, slots_TK, rows_O, choice_O, over_E, hosted_E, touched,
      touched_host, capacity_E, inv_S);
  return cudaGetLastError();
}

}  // namespace adaptmoe
