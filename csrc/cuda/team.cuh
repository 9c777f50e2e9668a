// The parallel primitives the solver cores run on inside CUDA kernels:
//   - CudaBlockTeam (lap/block_lsap.h): one thread block (a multiple of 32 threads) shares one
//     problem. reduce() is a butterfly of warp shuffles, then one slot per warp in shared
//     memory; it doubles as the barrier (with memory ordering) the algorithm relies on.
//   - CudaGrid (lap/auction_lsap.h): every thread of a cooperative launch; a warp scans a row;
//     sync() is the cooperative-groups grid barrier. CudaBlockGrid: the same on one block.
#pragma once

#include <cooperative_groups.h>

#include <cstdint>
#include <type_traits>

#include "lap/block_lsap.h"

namespace nat {
namespace lap {

// merge() folded over the 32 lanes of a warp by a butterfly of shuffles; every lane gets the
// same value provided merge() picks by a total order (ArgMin, MinIndex and MergeTop2 do, ties
// broken by index; MinDouble / MaxDouble may differ in the sign of a zero, which compares equal).
template <typename V, typename Merge>
__device__ V warp_allreduce(V x, Merge merge) {
  static_assert(std::is_trivially_copyable<V>::value && sizeof(V) % 4 == 0);
  constexpr int kWords = sizeof(V) / 4;
  for (int offset = 16; offset > 0; offset >>= 1) {
    uint32_t w[kWords];
    memcpy(w, &x, sizeof(V));
#pragma unroll
    for (int k = 0; k < kWords; ++k) w[k] = __shfl_xor_sync(0xffffffffu, w[k], offset);
    V other;
    memcpy(&other, w, sizeof(V));
    x = merge(x, other);
  }
  return x;
}

class CudaBlockTeam {
 public:
  static constexpr int kMaxWarps = 32;
  static constexpr int kSlotWords = 14;  // room for the largest value reduced (Top2: 56 bytes)
  // Shared memory for two alternating sets of per-warp slots, so a reduction can start before
  // every thread has read the previous one's result.
  struct Slots {
    uint32_t words[2][kMaxWarps][kSlotWords];
  };

  __device__ explicit CudaBlockTeam(Slots* slots) : slots_(slots) {}

  __device__ int64_t rank() const { return threadIdx.x; }
  __device__ int64_t size() const { return blockDim.x; }
  __device__ void sync() { __syncthreads(); }

  template <typename V, typename Merge>
  __device__ V reduce(V x, Merge merge) {
    static_assert(sizeof(V) <= 4 * kSlotWords);
    x = warp_allreduce(x, merge);
    const int warps = (blockDim.x + 31) >> 5;
    if (warps == 1) {
      __syncwarp();  // memory ordering between the lanes, as a block barrier would give
      return x;
    }
    auto& set = slots_->words[parity_];
    parity_ ^= 1;
    if ((threadIdx.x & 31) == 0) memcpy(set[threadIdx.x >> 5], &x, sizeof(V));
    __syncthreads();
    V result;
    memcpy(&result, set[0], sizeof(V));
    for (int w = 1; w < warps; ++w) {
      V other;
      memcpy(&other, set[w], sizeof(V));
      result = merge(result, other);
    }
    return result;
  }

 private:
  Slots* slots_;
  int parity_ = 0;
};

class CudaGrid {
 public:
  __device__ int64_t rank() const { return int64_t{blockIdx.x} * blockDim.x + threadIdx.x; }
  __device__ int64_t size() const { return int64_t{gridDim.x} * blockDim.x; }
  __device__ int64_t group() const { return rank() >> 5; }
  __device__ int64_t groups() const { return size() >> 5; }
  __device__ int64_t lane() const { return threadIdx.x & 31; }
  __device__ int64_t lanes() const { return 32; }
  __device__ void sync() { cooperative_groups::this_grid().sync(); }
  template <typename V, typename Merge>
  __device__ V group_reduce(V x, Merge merge) {
    return warp_allreduce(x, merge);
  }
  __device__ void atomic_min(uint64_t* p, uint64_t x) {
    atomicMin(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(x));
  }
  __device__ void atomic_add(uint64_t* p, uint64_t x) {
    atomicAdd(reinterpret_cast<unsigned long long*>(p), static_cast<unsigned long long>(x));
  }
  __device__ uint64_t load(const uint64_t* p) const {
    return *reinterpret_cast<const volatile uint64_t*>(p);
  }
};

// The Grid of one thread block (its warps are the groups): auction_lsap.h's prepass on a single
// block, with block barriers instead of grid barriers, for problems small enough that one block's
// warps bid fast enough; the atomics and loads are CudaGrid's.
class CudaBlockGrid : public CudaGrid {
 public:
  __device__ int64_t rank() const { return threadIdx.x; }
  __device__ int64_t size() const { return blockDim.x; }
  __device__ int64_t group() const { return threadIdx.x >> 5; }
  __device__ int64_t groups() const { return blockDim.x >> 5; }
  __device__ void sync() { __syncthreads(); }
};

}  // namespace lap
}  // namespace nat
