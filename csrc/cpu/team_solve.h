// The GPU solvers' algorithms run on host threads (cpu/linear_sum_assignment_team_kernel.cpp):
// for the test-only team op, and for solver='auction' on CPU tensors.
#pragma once

#include <ATen/ATen.h>

#include "ops_common.h"

namespace nat {

// Solves the problems of `cost` ([B, n, m], float32/float64, contiguous) one after another,
// each by `threads` host threads: Solver::kJv runs lap/block_lsap.h, Solver::kAuction
// lap/auction_lsap.h (square only). Fills `out` (which must hold duals) and `status` ([B, 2]).
void solve_on_host_threads(const at::Tensor& cost, bool maximize, int64_t threads, Solver solver,
                           SolveOutputs& out, int64_t* status);

}  // namespace nat
