// CPU kernels of nat::linear_sum_assignment and nat::linear_sum_assignment_with_duals:
// the batch solved in parallel by the host solver core (lap/lsap.h); solver='auction' runs the
// GPU's large-problem algorithm serially instead (cpu/team_solve.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/team_solve.h"
#include "lap/lsap.h"
#include "ops_common.h"

namespace nat {
namespace {

// info: see finish_solve (nullptr: raise on failure).
std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_cpu(const at::Tensor& cost_in, bool maximize,
                                                         c10::string_view solver_name,
                                                         bool with_duals, const char* op,
                                                         at::Tensor* info = nullptr) {
  check_cost(cost_in, op);
  const Solver solver = parse_solver(solver_name, op);
  check_solver_shape(solver, cost_in.size(-2), cost_in.size(-1), op);
  const auto [cost, batched] = prepare_cost(cost_in);
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  at::Tensor status = at::zeros({B, 2}, cost.options().dtype(at::kLong));
  int64_t* st = status.data_ptr<int64_t>();
  if (solver == Solver::kAuction) {
    SolveOutputs out(cost, true);
    solve_on_host_threads(cost, maximize, 1, solver, out, st);
    // The tie rule of lap::solve, so every CPU solver gives the same answer (lap/lsap.h).
    AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "canonicalize", [&] {
      lap::Workspace ws;
      for (int64_t b = 0; b < B; ++b) {
        if (st[2 * b] != lap::kSolved) continue;
        lap::canonicalize_square(n, cost.const_data_ptr<scalar_t>() + b * n * m, maximize,
                                 out.col4row.data_ptr<int64_t>() + b * n,
                                 out.v.const_data_ptr<double>() + b * m, ws);
      }
    });
    finish_solve(op, status, cost, batched, maximize, out, info);
    return out.result(batched, with_duals);
  }
  SolveOutputs out(cost, with_duals);

  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "linear_sum_assignment", [&] {
    const scalar_t* data = cost.const_data_ptr<scalar_t>();
    int64_t* x = out.col4row.data_ptr<int64_t>();
    double* u = with_duals ? out.u.data_ptr<double>() : nullptr;
    double* v = with_duals ? out.v.data_ptr<double>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      lap::Workspace ws;
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* cb = data + b * n * m;
        const int64_t bad = lap::find_invalid_entry(cb, n * m, maximize);
        if (bad >= 0) {
          st[2 * b] = lap::kInvalidEntry;
          st[2 * b + 1] = bad;
          continue;
        }
        st[2 * b] = lap::solve(n, m, cb, maximize, x + b * n, u ? u + b * n : nullptr,
                               v ? v + b * m : nullptr, ws);
      }
    });
  });
  finish_solve(op, status, cost, batched, maximize, out, info);
  return out.result(batched, with_duals);
}

at::Tensor linear_sum_assignment_cpu(const at::Tensor& cost, bool maximize,
                                     c10::string_view solver) {
  return std::get<0>(solve_cpu(cost, maximize, solver, false, "linear_sum_assignment"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sum_assignment_with_duals_cpu(
    const at::Tensor& cost, bool maximize, c10::string_view solver) {
  return solve_cpu(cost, maximize, solver, true, "linear_sum_assignment_with_duals");
}

std::tuple<at::Tensor, at::Tensor> linear_sum_assignment_ex_cpu(const at::Tensor& cost,
                                                                bool maximize,
                                                                c10::string_view solver,
                                                                bool check_errors) {
  return solve_ex(check_errors, [&](at::Tensor* info) {
    return std::get<0>(
        solve_cpu(cost, maximize, solver, false, "linear_sum_assignment_ex", info));
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CPU, m) {
  m.impl("linear_sum_assignment", &linear_sum_assignment_cpu);
  m.impl("linear_sum_assignment_with_duals", &linear_sum_assignment_with_duals_cpu);
  m.impl("linear_sum_assignment_ex", &linear_sum_assignment_ex_cpu);
}

}  // namespace nat
