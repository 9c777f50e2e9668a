// Host implementations of the Team that block_lsap.h runs on and of the Grid that
// auction_lsap.h runs on (the GPU's are in cuda/team.cuh). The serial ones give the sequential
// instance of each algorithm; the threaded ones run it on real threads with a barrier, so the
// ownership of data, the atomics and the barrier placement are tested on the CPU.
#pragma once

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstring>
#include <memory>
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

// The serial grid: one thread, a group of one lane.
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

// One HostTeamShared per group of `lanes` threads, for HostThreadGrid.
inline std::vector<std::unique_ptr<HostTeamShared>> make_group_shares(int64_t threads,
                                                                      int64_t lanes) {
  std::vector<std::unique_ptr<HostTeamShared>> shares;
  for (int64_t g = 0; g < threads / lanes; ++g) shares.push_back(std::make_unique<HostTeamShared>(lanes));
  return shares;
}

// Threads in groups of `lanes` consecutive ranks; a group's lanes share `group_shared` (a
// barrier and slots of their own), so group_reduce is a real reduction, as a warp's on the GPU.
class HostThreadGrid {
 public:
  HostThreadGrid(HostTeamShared& shared, HostTeamShared& group_shared, int64_t rank, int64_t size,
                 int64_t lanes)
      : shared_(shared), group_team_(group_shared, rank % lanes, lanes), rank_(rank),
        size_(size), lanes_(lanes) {}
  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }
  int64_t group() const { return rank_ / lanes_; }
  int64_t groups() const { return size_ / lanes_; }
  int64_t lane() const { return rank_ % lanes_; }
  int64_t lanes() const { return lanes_; }
  void sync() { shared_.barrier.arrive_and_wait(); }
  template <typename V, typename Merge>
  V group_reduce(const V& x, Merge merge) {
    return group_team_.reduce(x, merge);
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
  HostThreadTeam group_team_;
  int64_t rank_, size_, lanes_;
};

}  // namespace lap
}  // namespace nat
