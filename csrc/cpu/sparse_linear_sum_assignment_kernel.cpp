// CPU kernel of nat::sparse_linear_sum_assignment: one sparse problem (CSR candidate lists) solved
// by the host sparse solver core (lap/sparse_lsap.h), optionally warm from a previous matching
// and prices. nat_ext.assign_full calls it once a pricing round.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "lap/sparse_lsap.h"

namespace nat {
namespace {

constexpr const char* kOp = "sparse_linear_sum_assignment";

void check_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t size) {
  TORCH_CHECK_VALUE(t.dim() == 1, kOp, ": ", name, " should be a 1-D tensor, got ", t.dim(),
                    "-D with shape ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, kOp, ": ", name, " should be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(size < 0 || t.size(0) == size, kOp, ": ", name, " should have ", size,
                    " entries, got ", t.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_linear_sum_assignment_cpu(
    const at::Tensor& crow_in, const at::Tensor& col_in, const at::Tensor& cost_in, int64_t m,
    bool maximize, const std::optional<at::Tensor>& init_col4row,
    const std::optional<at::Tensor>& init_v, const std::optional<at::Tensor>& abort) {
  check_vector(crow_in, "crow", at::kLong, -1);
  TORCH_CHECK_VALUE(crow_in.size(0) >= 1, kOp, ": crow should have n + 1 >= 1 entries, got 0");
  const int64_t n = crow_in.size(0) - 1;
  TORCH_CHECK_VALUE(n <= m, kOp, ": the problem should have no more rows than columns (n <= m), "
                    "got n=", n, ", m=", m);
  check_vector(col_in, "col", at::kLong, -1);
  check_vector(cost_in, "cost", at::kDouble, col_in.size(0));
  const at::Tensor crow = crow_in.contiguous(), col = col_in.contiguous();
  const at::Tensor cost = cost_in.contiguous();
  const int64_t nnz = col.size(0);
  const int64_t* cr = crow.const_data_ptr<int64_t>();
  const int64_t* cl = col.const_data_ptr<int64_t>();
  const double* cs = cost.const_data_ptr<double>();
  TORCH_CHECK_VALUE(cr[0] == 0 && cr[n] == nnz, kOp, ": crow should run from 0 to nnz=", nnz,
                    ", got ", cr[0], " to ", cr[n]);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_VALUE(cr[i] <= cr[i + 1], kOp, ": crow should be non-decreasing, got crow[", i,
                      "]=", cr[i], " > crow[", i + 1, "]=", cr[i + 1]);
  }
  for (int64_t e = 0; e < nnz; ++e) {
    TORCH_CHECK_VALUE(cl[e] >= 0 && cl[e] < m, kOp, ": col[", e, "]=", cl[e],
                      " is out of range [0, ", m, ")");
    TORCH_CHECK_VALUE(std::isfinite(cs[e]), kOp, ": cost[", e, "]=", cs[e], " is not finite");
  }
  const auto opts = cost.options();
  at::Tensor col4row = at::full({n}, -1, opts.dtype(at::kLong));
  at::Tensor u = at::empty({n}, opts), v = at::empty({m}, opts);
  int64_t* x = col4row.data_ptr<int64_t>();
  const bool warm = init_col4row.has_value();
  if (warm) {
    check_vector(*init_col4row, "init_col4row", at::kLong, n);
    const at::Tensor x0 = init_col4row->contiguous();
    const int64_t* xi = x0.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK_VALUE(xi[i] >= -1 && xi[i] < m, kOp, ": init_col4row[", i, "]=", xi[i],
                        " should be a column in [0, ", m, ") or -1");
      x[i] = xi[i];
    }
  }
  at::Tensor v0;
  if (init_v.has_value()) {
    check_vector(*init_v, "init_v", at::kDouble, m);
    v0 = init_v->contiguous();
    TORCH_CHECK_VALUE(at::isfinite(v0).all().item<bool>(), kOp, ": init_v should be finite");
  }
  const int32_t* stop = nullptr;
  if (abort.has_value()) {
    TORCH_CHECK_VALUE(abort->numel() == 1 && abort->scalar_type() == at::kInt &&
                          abort->device().is_cpu(),
                      kOp, ": abort should be a CPU int32 tensor of one element, got ",
                      abort->scalar_type(), " of shape ", abort->sizes());
    stop = abort->const_data_ptr<int32_t>();  // read while another thread may set it
  }
  const lap::SparseProblem problem{n, m, cr, cl, cs};
  lap::SparseWorkspace ws;
  bool interrupted = false;
  const lap::Status status = lap::sparse_solve(
      problem, maximize, warm, v0.defined() ? v0.const_data_ptr<double>() : nullptr, x,
      u.data_ptr<double>(), v.data_ptr<double>(), ws, stop, &interrupted,
      [](int64_t count, const std::function<void(int64_t, int64_t)>& body) {
        at::parallel_for(0, count, 2048, body);
      });
  TORCH_CHECK_VALUE(status == lap::kSolved, kOp,
                    ": the problem is infeasible: no matching of every row uses only the given "
                    "edges");
  return {col4row, u, v};
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CPU, m) {
  m.impl("sparse_linear_sum_assignment", &sparse_linear_sum_assignment_cpu);
}

}  // namespace nat
