// Outcome of solving one problem, shared by the solver cores and the op layer that reports it.
#pragma once

#include <cstdint>

namespace nat {
namespace lap {

enum Status : int64_t {
  kSolved = 0,
  kInfeasible = 1,    // no assignment of every row avoids the forbidden (infinite) entries
  kInvalidEntry = 2,  // NaN, or -inf (+inf when maximising)
};

}  // namespace lap
}  // namespace nat
