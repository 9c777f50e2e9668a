// The Team that lap/block_lsap.h runs on inside a CUDA kernel: one thread block (a multiple of
// 32 threads) shares one problem. Reductions are warp shuffles, then one slot per warp in shared
// memory; every reduction doubles as the barrier (with memory ordering) the algorithm relies on.
#pragma once

#include "lap/block_lsap.h"

namespace nat {
namespace lap {

class CudaBlockTeam {
 public:
  static constexpr int kMaxWarps = 32;
  // candidate_slots and index_slots: shared memory, 2 * kMaxWarps entries each (two alternating
  // sets, so a reduction can start before every thread has read the previous one's result).
  __device__ CudaBlockTeam(Candidate* candidate_slots, int64_t* index_slots)
      : candidate_slots_(candidate_slots), index_slots_(index_slots) {}

  __device__ int64_t rank() const { return threadIdx.x; }
  __device__ int64_t size() const { return blockDim.x; }
  __device__ void sync() { __syncthreads(); }

  __device__ Candidate argmin(const Candidate& c) {
    return reduce(c, candidate_slots_, [](const Candidate& a, const Candidate& b) { return better(a, b); });
  }

  __device__ int64_t min_index(int64_t k) {
    return reduce(k, index_slots_, [](int64_t a, int64_t b) { return a < b; });
  }

 private:
  static constexpr unsigned kFullMask = 0xffffffffu;

  __device__ static int64_t shuffle_xor(int64_t x, int offset) {
    return __shfl_xor_sync(kFullMask, x, offset);
  }
  __device__ static Candidate shuffle_xor(const Candidate& c, int offset) {
    return Candidate{__shfl_xor_sync(kFullMask, c.d, offset), __shfl_xor_sync(kFullMask, c.v, offset),
                     __shfl_xor_sync(kFullMask, c.j, offset),
                     __shfl_xor_sync(kFullMask, c.assigned, offset)};
  }

  // Block-wide minimum under `less`, returned to every thread: a butterfly within each warp,
  // then one slot per warp in shared memory.
  template <typename V, typename Less>
  __device__ V reduce(V x, V* slot_sets, Less less) {
    for (int offset = 16; offset > 0; offset >>= 1) {
      const V o = shuffle_xor(x, offset);
      if (less(o, x)) x = o;
    }
    const int warps = (blockDim.x + 31) >> 5;
    if (warps == 1) {
      __syncwarp();  // memory ordering between the lanes, as a block barrier would give
      return x;
    }
    V* slots = slot_sets + parity_ * kMaxWarps;
    parity_ ^= 1;
    if ((threadIdx.x & 31) == 0) slots[threadIdx.x >> 5] = x;
    __syncthreads();
    V best = slots[0];
    for (int w = 1; w < warps; ++w) {
      if (less(slots[w], best)) best = slots[w];
    }
    return best;
  }

  Candidate* candidate_slots_;
  int64_t* index_slots_;
  int parity_ = 0;
};

}  // namespace lap
}  // namespace nat
