// Every op schema of the nat library, and nothing else. Kernels live in cpu/ and cuda/;
// fake (meta) kernels are registered from Python in nat_ext/ops.py.
//
// solver: "auto" picks by device and size; "jv" is shortest augmenting paths per problem (CPU:
// lap/lsap.h; GPU: one thread block a problem, lap/block_lsap.h); "auction" is for large square
// problems (lap/auction_lsap.h: a whole-GPU auction warm start, then exact augmenting paths; on
// the CPU the same algorithm runs serially, for testing). Every solver is exact.
#include <torch/library.h>

TORCH_LIBRARY(nat, m) {
  // cost: [n, m] or [B, n, m], n <= m. Returns int64 [n] / [B, n]: the column of each row.
  m.def("linear_sum_assignment(Tensor cost, bool maximize=False, str solver=\"auto\") -> Tensor");
  // Same, plus float64 duals u [.., n], v [.., m] of the problem as posed: u_i + v_j <= c_ij
  // (>= when maximising) with equality on assigned pairs, so optimality can be certified.
  m.def(
      "linear_sum_assignment_with_duals(Tensor cost, bool maximize=False, str solver=\"auto\") -> "
      "(Tensor col4row, Tensor u, Tensor v)");
  // feats: [n, d] or [B, n, d]; targets: [m, d] or [B, m, d], n <= m. Returns int64 [n] / [B, n]:
  // the target of each feature row, one-to-one, maximising the sum of dot products.
  m.def("assign(Tensor feats, Tensor targets, str solver=\"auto\") -> Tensor");
  // Test-only: the CUDA solvers' algorithms ("jv": lap/block_lsap.h; "auction":
  // lap/auction_lsap.h) run by `threads` host threads, so the GPU code paths are checked on
  // machines without a GPU. Same outputs as the duals op.
  m.def(
      "_linear_sum_assignment_team(Tensor cost, bool maximize, int threads, str solver=\"jv\") -> "
      "(Tensor col4row, Tensor u, Tensor v)");
}
