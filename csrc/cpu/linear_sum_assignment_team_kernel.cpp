// CPU kernel of nat::_linear_sum_assignment_team: the GPU solver's algorithm (lap/block_lsap.h)
// run by `threads` host threads with a barrier, so the tests check the exact code the CUDA
// kernel runs, its column ownership and its barriers, against scipy and dual certificates.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <thread>
#include <tuple>
#include <vector>

#include "lap/block_lsap.h"
#include "lap/host_team.h"
#include "ops_common.h"

namespace nat {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sum_assignment_team_cpu(
    const at::Tensor& cost_in, bool maximize, int64_t threads) {
  const char* op = "_linear_sum_assignment_team";
  check_cost(cost_in, op);
  TORCH_CHECK_VALUE(threads >= 1 && threads <= 64, op, ": threads should be in [1, 64], got ",
                    threads);
  const auto [cost, batched] = prepare_cost(cost_in);
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  SolveOutputs out(cost, true);
  at::Tensor status = at::zeros({B, 2}, cost.options().dtype(at::kLong));
  int64_t* st = status.data_ptr<int64_t>();
  std::vector<double> v(m), d(m), saved_v(m), saved_d(m);
  std::vector<int64_t> pred(m), row4col(m), free_rows(n);

  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "_linear_sum_assignment_team", [&] {
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* cb = cost.const_data_ptr<scalar_t>() + b * n * m;
      const lap::BlockState s{v.data(),    d.data(),       saved_v.data(),
                              saved_d.data(), pred.data(), row4col.data(),
                              out.col4row.data_ptr<int64_t>() + b * n, free_rows.data()};
      double* u = out.u.data_ptr<double>() + b * n;
      double* vo = out.v.data_ptr<double>() + b * m;
      auto run = [&](auto& team) {
        int64_t bad = -1;
        const lap::Status code = maximize ? lap::block_lsap<scalar_t, true>(team, n, m, cb, s, u, vo, &bad)
                                      : lap::block_lsap<scalar_t, false>(team, n, m, cb, s, u, vo, &bad);
        if (team.rank() == 0) {
          st[2 * b] = code;
          st[2 * b + 1] = bad;
        }
      };
      if (threads == 1) {
        lap::SerialTeam team;
        run(team);
        continue;
      }
      lap::HostTeamShared shared(threads);
      std::vector<std::thread> pool;
      for (int64_t r = 0; r < threads; ++r) {
        pool.emplace_back([&, r] {
          lap::HostThreadTeam team(shared, r, threads);
          run(team);
        });
      }
      for (auto& t : pool) t.join();
    }
  });
  raise_on_failure(op, status, cost, batched, maximize);
  return out.result(batched, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CPU, m) {
  m.impl("_linear_sum_assignment_team", &linear_sum_assignment_team_cpu);
}

}  // namespace nat
