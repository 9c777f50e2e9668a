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
  // The _ex variants, as torch.linalg's: with check_errors=False they never sync with the host
  // and never raise for the values of the input; info ([B] / [], int64, on the input's device)
  // holds each problem's status (0 solved, 1 infeasible, 2 NaN or -inf entry; 3 iteration limit
  // and 4 certificate failed are solver faults, lap/status.h) and the rows of a failed problem
  // are -1. With check_errors=True they raise (or fall back) as the plain ops do.
  m.def(
      "linear_sum_assignment_ex(Tensor cost, bool maximize=False, str solver=\"auto\", "
      "bool check_errors=False) -> (Tensor col4row, Tensor info)");
  m.def(
      "assign_ex(Tensor feats, Tensor targets, str solver=\"auto\", bool check_errors=False) -> "
      "(Tensor col4row, Tensor info)");
  // The independent optimality check that follows every CUDA solve (lap/certify.h): cost [n, m]
  // or [B, n, m] (n <= m), col4row int64 [.., n], v [.., m] the column duals of the problem as
  // posed (as linear_sum_assignment_with_duals returns them). Returns int64 [B] ([] unbatched)
  // on cost's device: 0 when the certificate holds, 4 when it does not (including rows of -1).
  m.def("certify(Tensor cost, Tensor col4row, Tensor v, bool maximize=False) -> Tensor");
  // Test-only: certify, then what a plain op does with the problems that fail it (re-solve on the
  // CPU or raise, per NAT_CUDA_FALLBACK: solver_faults.h), so the fault path is exercised with a
  // deliberately wrong assignment on any device. Returns col4row with the failed problems fixed.
  m.def("_certify_or_fall_back(Tensor cost, Tensor col4row, Tensor v, bool maximize=False) -> Tensor");
  // The solvers' environment settings NAT_CUDA_FALLBACK and NAT_CUDA_TIMEOUT_S, parsed at each
  // call (solver_faults.h; a bad value raises ValueError). What nat_ext.faults reads, so the two
  // are parsed in one place.
  m.def("_solver_settings() -> (str fallback, float timeout_s)");
  // The status names, indexed by status (lap/status.h), and the statuses that are solver faults.
  m.def("_solver_statuses() -> (str[] names, int[] faults)");
  // Test-only: the CUDA solvers' algorithms ("jv": lap/block_lsap.h; "auction":
  // lap/auction_lsap.h) run by `threads` host threads, so the GPU code paths are checked on
  // machines without a GPU. Same outputs as the duals op.
  m.def(
      "_linear_sum_assignment_team(Tensor cost, bool maximize, int threads, str solver=\"jv\") -> "
      "(Tensor col4row, Tensor u, Tensor v)");
  // One sparse problem: row i may take only the columns col[crow[i]:crow[i+1]] at float64 costs
  // cost[crow[i]:crow[i+1]], n = crow.size(0) - 1 <= m columns. Optionally warm from a previous
  // matching (init_col4row, -1 for a free row) and prices (init_v, of the problem as posed).
  // Returns int64 col4row [n] and float64 duals u [n], v [m] certifying optimality over the
  // edges (as linear_sum_assignment_with_duals's); raises ValueError when infeasible. abort: a
  // CPU int32 [1] another thread may set non-zero to stop the solve early (the rows it had not
  // matched come back -1).
  m.def(
      "sparse_linear_sum_assignment(Tensor crow, Tensor col, Tensor cost, int m, "
      "bool maximize=False, Tensor? init_col4row=None, Tensor? init_v=None, "
      "Tensor? abort=None) -> (Tensor col4row, Tensor u, Tensor v)");
  // Internal to nat_ext.assign_full's passes (CPU; csrc/cpu/full_scan_kernel.cpp): one fused
  // pass of feats [r, d] against a tile of targets [t, d] (global columns col0..), ranking
  // s_ij - row_off[i] - col_off[j] with the held pairs skipped, into each row's running list
  // (row_vals/row_idx/row_exact [r, K]: the K largest above row_thr, with exact scores),
  // count above row_thr, maximum, and each column's running top rows (col_vals/col_rows
  // [kc, t], rows row0..). Updates the state tensors in place.
  m.def(
      "_full_scan(Tensor feats, Tensor targets, Tensor? feats_exact, Tensor? targets_exact, "
      "Tensor? row_off, Tensor? col_off, Tensor? row_thr, Tensor? held_crow, Tensor? held_col, "
      "int row0, int col0, Tensor(a!) row_vals, Tensor(b!) row_idx, Tensor(c!) row_exact, "
      "Tensor(d!) row_count, Tensor(e!) row_max, Tensor(f!) col_vals, Tensor(g!) col_rows) -> ()");
}
