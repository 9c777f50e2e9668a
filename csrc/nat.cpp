// Every op schema of the nat library, and nothing else. Kernels live in cpu/ and cuda/;
// fake (meta) kernels are registered from Python in nat_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(nat, m) {
  // cost: [n, m] or [B, n, m], n <= m. Returns int64 [n] / [B, n]: the column of each row.
  m.def("linear_sum_assignment(Tensor cost, bool maximize=False) -> Tensor");
  // Same, plus float64 duals u [.., n], v [.., m] of the problem as posed: u_i + v_j <= c_ij
  // (>= when maximising) with equality on assigned pairs, so optimality can be certified.
  m.def(
      "linear_sum_assignment_with_duals(Tensor cost, bool maximize=False) -> (Tensor col4row, "
      "Tensor u, Tensor v)");
  // feats: [n, d] or [B, n, d]; targets: [m, d] or [B, m, d], n <= m. Returns int64 [n] / [B, n]:
  // the target of each feature row, one-to-one, maximising the sum of dot products.
  m.def("assign(Tensor feats, Tensor targets) -> Tensor");
  // Test-only: the CUDA solver's algorithm (lap/block_lsap.h) run by `threads` host threads, so
  // the GPU code path is checked on machines without a GPU. Same outputs as the duals op.
  m.def(
      "_linear_sum_assignment_team(Tensor cost, bool maximize, int threads) -> (Tensor col4row, "
      "Tensor u, Tensor v)");
}
