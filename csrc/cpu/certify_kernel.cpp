// CPU kernel of nat::certify (lap/certify.h), the batch in parallel: the twin of the check that
// follows every CUDA solve, and the way to certify any assignment with its column duals.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "lap/certify.h"
#include "ops_common.h"

namespace nat {
namespace {

template <typename T, bool kMax>
lap::Status certify_problem(const T* cost, int64_t n, int64_t m, const int64_t* col4row,
                            const double* v, double rel, std::vector<char>& used) {
  namespace cert = lap::certify;
  used.assign(m, 0);
  cert::Verdict verdict = cert::empty_verdict();
  for (int64_t i = 0; i < n; ++i) {
    const T* row = cost + i * m;
    const int64_t j = col4row[i];
    const bool unique = j >= 0 && j < m && !used[j];
    if (unique) used[j] = 1;
    cert::judge_row<T, kMax>(verdict, row, v, m, j, unique, cert::scan_row<T, kMax>(row, v, m, 0, 1));
  }
  for (int64_t j = 0; j < m; ++j) cert::judge_column<kMax>(verdict, v[j], used[j]);
  return cert::conclude(verdict, rel);
}

at::Tensor certify_cpu(const at::Tensor& cost_in, const at::Tensor& col4row_in,
                       const at::Tensor& v_in, bool maximize) {
  check_certify(cost_in, col4row_in, v_in);
  const auto [cost, batched] = prepare_cost(cost_in);
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  const at::Tensor col4row = col4row_in.reshape({B, n}).contiguous();
  const at::Tensor v = v_in.to(at::kDouble).reshape({B, m}).contiguous();
  at::Tensor status = at::zeros({B}, cost.options().dtype(at::kLong));
  int64_t* st = status.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "certify", [&] {
    const double rel = lap::certify::certify_rel(cost.scalar_type() == at::kDouble);
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      std::vector<char> used;
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* c = cost.const_data_ptr<scalar_t>() + b * n * m;
        const int64_t* x = col4row.const_data_ptr<int64_t>() + b * n;
        const double* vb = v.const_data_ptr<double>() + b * m;
        st[b] = maximize ? certify_problem<scalar_t, true>(c, n, m, x, vb, rel, used)
                         : certify_problem<scalar_t, false>(c, n, m, x, vb, rel, used);
      }
    });
  });
  return batched ? status : status.squeeze(0);
}

at::Tensor certify_or_fall_back_cpu(const at::Tensor& cost, const at::Tensor& col4row,
                                    const at::Tensor& v, bool maximize) {
  return certify_or_fall_back(cost, col4row, certify_cpu(cost, col4row, v, maximize), maximize);
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CPU, m) {
  m.impl("certify", &certify_cpu);
  m.impl("_certify_or_fall_back", &certify_or_fall_back_cpu);
}

}  // namespace nat
