// What every backend shares: argument checks, the assign score matrix, and the errors raised
// from a solver's per-problem status, so each is written once.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>

#include "lap/status.h"
#include "solver_faults.h"

namespace nat {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// cost: [n, m] or [B, n, m] floating point with n <= m.
inline void check_cost(const at::Tensor& cost, const char* op) {
  TORCH_CHECK_VALUE(cost.dim() == 2 || cost.dim() == 3, op,
                    ": cost should be a 2-D [n, m] or 3-D [B, n, m] tensor, got ", cost.dim(),
                    "-D with shape ", cost.sizes());
  TORCH_CHECK_TYPE(is_supported_float(cost.scalar_type()), op,
                   ": cost should be float32, float64, float16 or bfloat16, got ",
                   cost.scalar_type());
  const int64_t n = cost.size(-2), m = cost.size(-1);
  TORCH_CHECK_VALUE(n <= m, op, ": cost should have no more rows than columns (n <= m), got n=",
                    n, ", m=", m, "; transpose it, or use nat_ext.linear_sum_assignment");
}

// The `solver` argument of the ops (see nat.cpp).
enum class Solver { kAuto, kJv, kAuction };

inline Solver parse_solver(std::string_view name, const char* op) {
  if (name == "auto") return Solver::kAuto;
  if (name == "jv") return Solver::kJv;
  if (name == "auction") return Solver::kAuction;
  TORCH_CHECK_VALUE(false, op, ": solver should be 'auto', 'jv' or 'auction', got '",
                    std::string(name), "'");
}

// The auction solver takes square problems only (its dual bookkeeping assumes every column is
// matched); the others take any n <= m.
inline void check_solver_shape(Solver solver, int64_t n, int64_t m, const char* op) {
  TORCH_CHECK_VALUE(solver != Solver::kAuction || n == m, op,
                    ": solver='auction' needs square problems (n == m), got n=", n, ", m=", m,
                    "; use solver='auto' or 'jv'");
}

// certify's arguments: a cost as check_cost takes it, col4row int64 [.., n] and v floating
// [.., m] batched as cost is, all on cost's device.
inline void check_certify(const at::Tensor& cost, const at::Tensor& col4row, const at::Tensor& v) {
  check_cost(cost, "certify");
  auto expect = cost.sizes().vec();
  expect.pop_back();
  TORCH_CHECK_VALUE(col4row.sizes() == at::IntArrayRef(expect), "certify: col4row should have shape ",
                    at::IntArrayRef(expect), " for cost of shape ", cost.sizes(), ", got ",
                    col4row.sizes());
  TORCH_CHECK_TYPE(col4row.scalar_type() == at::kLong, "certify: col4row should be int64, got ",
                   col4row.scalar_type());
  expect.back() = cost.size(-1);
  TORCH_CHECK_VALUE(v.sizes() == at::IntArrayRef(expect), "certify: v should have shape ",
                    at::IntArrayRef(expect), " for cost of shape ", cost.sizes(), ", got ",
                    v.sizes());
  TORCH_CHECK_TYPE(is_supported_float(v.scalar_type()),
                   "certify: v should be float32, float64, float16 or bfloat16, got ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(col4row.device() == cost.device() && v.device() == cost.device(),
                    "certify: cost, col4row and v should be on the same device, got cost on ",
                    cost.device(), ", col4row on ", col4row.device(), " and v on ", v.device());
}

// feats: [n, d] / [B, n, d]; targets: [m, d] / [B, m, d]; same dims, B, d, dtype and device;
// a solver name that takes the problem's shape.
inline void check_assign(const at::Tensor& feats, const at::Tensor& targets,
                         std::string_view solver) {
  TORCH_CHECK_VALUE(feats.dim() == 2 || feats.dim() == 3,
                    "assign: feats should be a 2-D [n, d] or 3-D [B, n, d] tensor, got ",
                    feats.dim(), "-D with shape ", feats.sizes());
  TORCH_CHECK_VALUE(targets.dim() == feats.dim(), "assign: targets should be ", feats.dim(),
                    "-D like feats (", feats.sizes(), "), got ", targets.dim(),
                    "-D with shape ", targets.sizes());
  TORCH_CHECK_TYPE(is_supported_float(feats.scalar_type()),
                   "assign: feats should be float32, float64, float16 or bfloat16, got ",
                   feats.scalar_type());
  TORCH_CHECK_TYPE(targets.scalar_type() == feats.scalar_type(),
                   "assign: targets should have the dtype of feats (", feats.scalar_type(),
                   "), got ", targets.scalar_type());
  TORCH_CHECK_VALUE(feats.device() == targets.device(),
                    "assign: feats and targets should be on the same device, got feats on ",
                    feats.device(), " and targets on ", targets.device());
  TORCH_CHECK_VALUE(feats.size(-1) == targets.size(-1),
                    "assign: feats and targets should have the same feature size d, got ",
                    feats.size(-1), " and ", targets.size(-1));
  if (feats.dim() == 3) {
    TORCH_CHECK_VALUE(feats.size(0) == targets.size(0),
                      "assign: feats and targets should have the same batch size B, got ",
                      feats.size(0), " and ", targets.size(0));
  }
  TORCH_CHECK_VALUE(feats.size(-2) <= targets.size(-2),
                    "assign: feats should have no more rows than targets (n <= m), got n=",
                    feats.size(-2), ", m=", targets.size(-2));
  check_solver_shape(parse_solver(solver, "assign"), feats.size(-2), targets.size(-2), "assign");
}

// The solver's view of a checked cost: [B, n, m], contiguous, float32 or float64 (float16 and
// bfloat16 widen to float32 exactly). Also returns whether the input was batched.
inline std::pair<at::Tensor, bool> prepare_cost(const at::Tensor& cost) {
  at::Tensor c = cost.scalar_type() == at::kHalf || cost.scalar_type() == at::kBFloat16
                     ? cost.to(at::kFloat)
                     : cost;
  const bool batched = c.dim() == 3;
  return {(batched ? c : c.unsqueeze(0)).contiguous(), batched};
}

// Outputs [B, n] int64 and, when asked, float64 duals [B, n] and [B, m] (else empty).
struct SolveOutputs {
  at::Tensor col4row, u, v;
  SolveOutputs(const at::Tensor& cost3d, bool with_duals) {
    const int64_t B = cost3d.size(0), n = cost3d.size(1), m = cost3d.size(2);
    const auto f64 = cost3d.options().dtype(at::kDouble);
    col4row = at::empty({B, n}, cost3d.options().dtype(at::kLong));
    u = at::empty({with_duals ? B : 0, n}, f64);
    v = at::empty({with_duals ? B : 0, m}, f64);
  }
  // Drops the batch dimension again for unbatched inputs.
  std::tuple<at::Tensor, at::Tensor, at::Tensor> result(bool batched, bool with_duals) const {
    if (batched) return {col4row, u, v};
    return {col4row.squeeze(0), with_duals ? u.squeeze(0) : u, with_duals ? v.squeeze(0) : v};
  }
};

// feats @ targets^T in float32 (float64 for float64 inputs): half-precision products would round
// away the optimum, so low-precision inputs are widened first. A -inf score (an overflow, or an
// infinite input) becomes NaN: maximising, the solvers would read -inf as a forbidden pair, but
// for assign every non-finite score is an invalid input, reported the same way on every device.
inline at::Tensor assign_scores(const at::Tensor& feats, const at::Tensor& targets) {
  const auto score_type = feats.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor scores =
      at::matmul(feats.to(score_type), targets.to(score_type).transpose(-1, -2));
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  return scores.nan_to_num_(nan, inf, nan);  // only -inf changes: one in-place pass
}

// The errors of a problem the solver could not take, in scipy's words, shared by the ops and
// the numpy entry point (numpy_lsap.cpp). `item` is "" or "[b]" for batch item b.
inline std::string invalid_entry_message(const char* op, const std::string& item, int64_t i,
                                         int64_t j, double value, bool maximize) {
  return c10::str(op, ": matrix contains invalid numeric entries: cost", item, "[", i, "][", j,
                  "] is ", value, " (NaN and ", maximize ? "+inf with maximize=True" : "-inf",
                  " are not allowed; ", maximize ? "-inf" : "+inf", " marks a forbidden pair)");
}

// b < 0: an unbatched problem.
inline std::string infeasible_message(const char* op, int64_t b) {
  if (b < 0) {
    return c10::str(op, ": cost matrix is infeasible: no assignment of every row avoids the "
                    "forbidden (infinite) entries");
  }
  return c10::str(op, ": cost matrix is infeasible: batch item ", b, " has no assignment of "
                  "every row that avoids the forbidden (infinite) entries");
}

// Raises the error for the first problem that failed. `status` is a CPU int64 [B, 2] tensor,
// {lap::Status, flat index of the bad entry} a problem;
// `cost` is the [B, n, m] matrix the solver read (for the offending value).
inline void raise_on_failure(const char* op, const at::Tensor& status, const at::Tensor& cost,
                             bool batched, bool maximize) {
  const int64_t* st = status.const_data_ptr<int64_t>();
  const int64_t B = status.size(0), m = cost.size(2);
  for (int64_t b = 0; b < B; ++b) {
    const std::string item = batched ? "[" + std::to_string(b) + "]" : std::string();
    if (st[2 * b] == lap::kInvalidEntry) {
      const int64_t i = st[2 * b + 1] / m, j = st[2 * b + 1] % m;
      if (std::string(op) == "assign") {
        TORCH_CHECK_VALUE(false, "assign: feats @ targets^T", item, "[", i, "][", j,
                          "] is not finite: feats or targets contains NaN or infinite values, or "
                          "the product overflowed");
      }
      TORCH_CHECK_VALUE(false, invalid_entry_message(op, item, i, j,
                                                     cost[b][i][j].item<double>(), maximize));
    }
    TORCH_CHECK_VALUE(st[2 * b] != lap::kInfeasible, infeasible_message(op, batched ? b : -1));
  }
}

// Ends a solve. With info == nullptr: one host sync, then the problems whose solver faulted
// (status 3 or 4) are re-solved on the CPU or raise, as NAT_CUDA_FALLBACK says
// (solver_faults.h), and the first problem with bad input raises. Else (the _ex ops without
// check_errors): no host sync; *info gets each problem's lap::Status ([B], or [] unbatched) and
// the rows of failed problems are set to -1, so no failure can pass for an answer.
inline void finish_solve(const char* op, const at::Tensor& status, const at::Tensor& cost,
                         bool batched, bool maximize, SolveOutputs& out, at::Tensor* info) {
  if (!info) {
    const at::Tensor st = status.cpu();
    resolve_solver_faults(op, st, cost, batched, maximize, out.col4row, out.u, out.v);
    raise_on_failure(op, st, cost, batched, maximize);
    return;
  }
  *info = status.select(1, 0).clone(at::MemoryFormat::Contiguous);
  out.col4row.masked_fill_(info->ne(lap::kSolved).unsqueeze(1), -1);
  if (!batched) *info = info->squeeze(0);
}

// An _ex op's result from solve(info), a backend's solve that takes finish_solve's `info`:
// with check_errors it raises on failure, so every problem's info is 0.
template <class Solve>
std::tuple<at::Tensor, at::Tensor> solve_ex(bool check_errors, Solve solve) {
  at::Tensor info;
  at::Tensor cols = solve(check_errors ? nullptr : &info);
  if (check_errors) info = at::zeros(cols.sizes().slice(0, cols.dim() - 1), cols.options());
  return {cols, info};
}

}  // namespace nat
