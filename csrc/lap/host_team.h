// Host implementations of the Team that block_lsap.h runs on (the GPU's is cuda/team.cuh).
// SerialTeam gives the sequential instance of the algorithm; HostThreadTeam runs it on real
// threads with a barrier, so the column ownership and barrier placement are tested on the CPU.
#pragma once

#include <barrier>
#include <cstdint>
#include <vector>

#include "lap/block_lsap.h"

namespace nat {
namespace lap {

struct SerialTeam {
  int64_t rank() const { return 0; }
  int64_t size() const { return 1; }
  void sync() {}
  Candidate argmin(const Candidate& c) { return c; }
  int64_t min_index(int64_t k) { return k; }
};

// What the threads of one HostThreadTeam share: the barrier and two sets of reduction slots
// (alternating sets let a reduction start before every thread has read the previous one).
struct HostTeamShared {
  explicit HostTeamShared(int64_t size)
      : barrier(size), candidates(2 * size), indices(2 * size) {}
  std::barrier<> barrier;
  std::vector<Candidate> candidates;
  std::vector<int64_t> indices;
};

class HostThreadTeam {
 public:
  HostThreadTeam(HostTeamShared& shared, int64_t rank, int64_t size)
      : shared_(shared), rank_(rank), size_(size) {}
  int64_t rank() const { return rank_; }
  int64_t size() const { return size_; }
  void sync() { shared_.barrier.arrive_and_wait(); }

  Candidate argmin(const Candidate& c) {
    Candidate* slots = shared_.candidates.data() + parity_ * size_;
    slots[rank_] = c;
    parity_ ^= 1;
    sync();
    Candidate best = slots[0];
    for (int64_t r = 1; r < size_; ++r) {
      if (better(slots[r], best)) best = slots[r];
    }
    return best;
  }

  int64_t min_index(int64_t k) {
    int64_t* slots = shared_.indices.data() + parity_ * size_;
    slots[rank_] = k;
    parity_ ^= 1;
    sync();
    int64_t best = slots[0];
    for (int64_t r = 1; r < size_; ++r) best = slots[r] < best ? slots[r] : best;
    return best;
  }

 private:
  HostTeamShared& shared_;
  int64_t rank_, size_;
  int parity_ = 0;
};

}  // namespace lap
}  // namespace nat
