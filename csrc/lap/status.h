// Outcome of solving one problem, shared by the solver cores and the op layer that reports it.
#pragma once

#include <cstdint>

namespace nat {
namespace lap {

enum Status : int64_t {
  kSolved = 0,
  kInfeasible = 1,    // no assignment of every row avoids the forbidden (infinite) entries
  kInvalidEntry = 2,  // NaN, or -inf (+inf when maximising)
  // Faults of a solver, never of the input: they mean a bug (or hardware we have not seen).
  kIterationLimit = 3,     // a loop hit its bound or found the matching arrays in disagreement
                           // (a search longer than m scans, row4col and col4row not inverse, a
                           // path flip longer than n + 1 hops or leaving the index range)
  kCertificateFailed = 4,  // the answer failed the independent check of lap/certify.h
};
constexpr int64_t kNumStatuses = 5;

// A fault of the solver (a bug to report), as opposed to the input's.
constexpr bool is_solver_fault(int64_t status) {
  return status == kIterationLimit || status == kCertificateFailed;
}

}  // namespace lap
}  // namespace nat
