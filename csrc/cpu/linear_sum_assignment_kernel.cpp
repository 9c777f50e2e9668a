// CPU kernels of nat::linear_sum_assignment and nat::linear_sum_assignment_with_duals:
// validation, dtype dispatch, and the batch solved in parallel by the host solver core.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "lap/lsap.h"

namespace nat {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> solve_cpu(const at::Tensor& cost_in, bool maximize,
                                                         bool with_duals, const char* op) {
  check_cost(cost_in, op);
  // float16/bfloat16 widen to float32 exactly; the solver reads float32 or float64.
  at::Tensor cost = cost_in.scalar_type() == at::kHalf || cost_in.scalar_type() == at::kBFloat16
                        ? cost_in.to(at::kFloat)
                        : cost_in;
  const bool batched = cost.dim() == 3;
  cost = (batched ? cost : cost.unsqueeze(0)).contiguous();
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);

  const auto f64 = cost.options().dtype(at::kDouble);
  at::Tensor col4row = at::empty({B, n}, cost.options().dtype(at::kLong));
  at::Tensor u = at::empty({with_duals ? B : 0, n}, f64);
  at::Tensor v = at::empty({with_duals ? B : 0, m}, f64);
  std::vector<int64_t> invalid(B, -1);
  std::vector<char> infeasible(B, 0);

  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "linear_sum_assignment", [&] {
    const scalar_t* data = cost.const_data_ptr<scalar_t>();
    int64_t* x = col4row.data_ptr<int64_t>();
    double* u_data = with_duals ? u.data_ptr<double>() : nullptr;
    double* v_data = with_duals ? v.data_ptr<double>() : nullptr;
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      lap::Workspace ws;
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* cb = data + b * n * m;
        invalid[b] = lap::find_invalid_entry(cb, n * m, maximize);
        if (invalid[b] >= 0) continue;
        const auto status = lap::solve(n, m, cb, maximize, x + b * n,
                                       u_data ? u_data + b * n : nullptr,
                                       v_data ? v_data + b * m : nullptr, ws);
        infeasible[b] = status == lap::Status::kInfeasible;
      }
    });
  });

  for (int64_t b = 0; b < B; ++b) {
    if (invalid[b] >= 0) {
      const int64_t i = invalid[b] / m, j = invalid[b] % m;
      const double value = cost[b][i][j].item<double>();
      TORCH_CHECK_VALUE(false, op, ": matrix contains invalid numeric entries: cost",
                        batched ? "[" + std::to_string(b) + "]" : std::string(), "[", i, "][", j,
                        "] is ", value, " (NaN and ", maximize ? "+inf with maximize=True" : "-inf",
                        " are not allowed; ", maximize ? "-inf" : "+inf", " marks a forbidden pair)");
    }
    TORCH_CHECK_VALUE(!infeasible[b], op, ": cost matrix is infeasible",
                      batched ? ": batch item " + std::to_string(b) : std::string(),
                      " has no assignment of every row that avoids the forbidden (infinite) entries");
  }
  if (!batched) {
    col4row = col4row.squeeze(0);
    if (with_duals) {
      u = u.squeeze(0);
      v = v.squeeze(0);
    }
  }
  return {col4row, u, v};
}

at::Tensor linear_sum_assignment_cpu(const at::Tensor& cost, bool maximize) {
  return std::get<0>(solve_cpu(cost, maximize, false, "linear_sum_assignment"));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sum_assignment_with_duals_cpu(
    const at::Tensor& cost, bool maximize) {
  return solve_cpu(cost, maximize, true, "linear_sum_assignment_with_duals");
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CPU, m) {
  m.impl("linear_sum_assignment", &linear_sum_assignment_cpu);
  m.impl("linear_sum_assignment_with_duals", &linear_sum_assignment_with_duals_cpu);
}

}  // namespace nat
