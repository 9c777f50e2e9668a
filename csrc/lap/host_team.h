// Host implementations of the Team that block_lsap.h runs on and of the Grid that
// auction_lsap.h runs on (the GPU's are in cuda/team.cuh). The serial ones give the sequential
// instance of each algorithm; the threaded ones run it on real threads with a barrier, so the
// ownership of data, the atomics and the barrier placement are tested on the CPU.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "lap/block_lsap.h"

namespace nat {
namespace lap {

struct SerialTeam {
  int64_t rank() const { return 0; }
  int64_t size() const { return 1; }
  void sync() {}
  template <typename V, typename Merge>
  V reduce(const V& x, Merge) {
    return x;
  }
};

// What the threads of one HostThreadTeam share: the barrier and two sets of reduction slots
// (alternating sets let a reduction start before every thread has read the previous one).
struct HostTeamShared {
  static constexpr size_t kSlotBytes = 64;
  explicit HostTeamShared(int64_t size) : barrier(size), slots(2 * size * kSlotBytes) {}
  std::barrier<> barrier;
  std::vector<unsigned char> slots;
};

class HostThreadTeam {
 public:
  HostThreadTeam(HostTeamShared& shared, int64_t rank, int64_t size)
      : shared_(shared), rank_(rank), size_(size) {}
  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }
  void sync() { shared_.barrier.arrive_and_wait(); }

  template <typename V, typename Merge>
  V reduce(const V& x, Merge merge) {
    static_assert(std::is_trivially_copyable_v<V> && sizeof(V) <= HostTeamShared::kSlotBytes);
    unsigned char* slots = shared_.slots.data() + parity_ * size_ * HostTeamShared::kSlotBytes;
    parity_ ^= 1;
    std::memcpy(slots + rank_ * HostTeamShared::kSlotBytes, &x, sizeof(V));
    sync();
    V result;
    std::memcpy(&result, slots, sizeof(V));
    for (int64_t r = 1; r < size_; ++r) {  // the same order in every thread: the same result
      V other;
      std::memcpy(&other, slots + r * HostTeamShared::kSlotBytes, sizeof(V));
      result = merge(result, other);
    }
    return result;
  }

 private:
  HostTeamShared& shared_;
  int64_t rank_, size_;
  int parity_ = 0;
};

// Grids: each thread is a group of one lane, so group_reduce is the identity.
struct SerialGrid : SerialTeam {
  int64_t group() const { return 0; }
  int64_t groups() const { return 1; }
  int64_t lane() const { return 0; }
  int64_t lanes() const { return 1; }
  template <typename V, typename Merge>
  V group_reduce(const V& x, Merge) {
    return x;
  }
  void atomic_min(uint64_t* p, uint64_t x) { *p = x < *p ? x : *p; }
  void atomic_add(uint64_t* p, uint64_t x) { *p += x; }
  uint64_t load(const uint64_t* p) const { return *p; }
};

class HostThreadGrid {
 public:
  HostThreadGrid(HostTeamShared& shared, int64_t rank, int64_t size)
      : shared_(shared), rank_(rank), size_(size) {}
  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }
  int64_t group() const { return rank_; }
  int64_t groups() const { return size_; }
  int64_t lane() const { return 0; }
  int64_t lanes() const { return 1; }
  void sync() { shared_.barrier.arrive_and_wait(); }
  template <typename V, typename Merge>
  V group_reduce(const V& x, Merge) {
    return x;
  }
  void atomic_min(uint64_t* p, uint64_t x) {
    std::atomic_ref<uint64_t> a(*p);
    uint64_t cur = a.load();
    while (x < cur && !a.compare_exchange_weak(cur, x)) {
    }
  }
  void atomic_add(uint64_t* p, uint64_t x) { std::atomic_ref<uint64_t>(*p).fetch_add(x); }
  uint64_t load(const uint64_t* p) const {
    return std::atomic_ref<uint64_t>(*const_cast<uint64_t*>(p)).load();
  }

 private:
  HostTeamShared& shared_;
  int64_t rank_, size_;
};

}  // namespace lap
}  // namespace nat
