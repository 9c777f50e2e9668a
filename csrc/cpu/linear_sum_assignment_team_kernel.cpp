// CPU kernel of nat::_linear_sum_assignment_team: the GPU solvers' algorithms (lap/block_lsap.h,
// lap/auction_lsap.h) run by `threads` host threads with a barrier, so the tests check the exact
// code the CUDA kernels run, its data ownership, atomics and barriers, against scipy and dual
// certificates.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string_view>
#include <thread>
#include <tuple>
#include <vector>

#include "cpu/team_solve.h"
#include "lap/auction_lsap.h"
#include "lap/block_lsap.h"
#include "lap/host_team.h"
#include "ops_common.h"

namespace nat {

void solve_on_host_threads(const at::Tensor& cost, bool maximize, int64_t threads, Solver solver,
                           SolveOutputs& out, int64_t* st) {
  const int64_t B = cost.size(0), n = cost.size(1), m = cost.size(2);
  // Workspace of either solver: 5 double and 2 int64 arrays of m, n free rows, the auction's
  // keys and counters.
  std::vector<double> w(5 * m);
  std::vector<int64_t> iw(2 * m + n);
  std::vector<uint64_t> keys(m), counters(lap::kNumCounters);
  AT_DISPATCH_FLOATING_TYPES(cost.scalar_type(), "_linear_sum_assignment_team", [&] {
    for (int64_t b = 0; b < B; ++b) {
      const scalar_t* cb = cost.const_data_ptr<scalar_t>() + b * n * m;
      int64_t* x = out.col4row.data_ptr<int64_t>() + b * n;
      double* u = out.u.data_ptr<double>() + b * n;
      double* vo = out.v.data_ptr<double>() + b * m;
      const lap::BlockState s{w.data(), w.data() + m, w.data() + 2 * m, w.data() + 3 * m,
                              iw.data(), iw.data() + m, x,            iw.data() + 2 * m};
      const lap::AuctionState a{w.data(), w.data() + 4 * m, x, iw.data() + m, keys.data(),
                                counters.data()};
      auto run = [&](auto& grid, auto& team) {
        int64_t bad = -1;
        lap::Status code;
        if (solver == Solver::kAuction) {
          const lap::BlockState r = lap::repair_state(a, s.d, s.saved_v, s.saved_d, s.pred);
          code = maximize ? lap::auction_lsap<scalar_t, true>(grid, team, n, cb, a, r, u, vo, &bad)
                          : lap::auction_lsap<scalar_t, false>(grid, team, n, cb, a, r, u, vo, &bad);
        } else {
          code = maximize ? lap::block_lsap<scalar_t, true>(team, n, m, cb, s, u, vo, &bad)
                          : lap::block_lsap<scalar_t, false>(team, n, m, cb, s, u, vo, &bad);
        }
        if (team.rank() == 0) {
          st[2 * b] = code;
          st[2 * b + 1] = bad;
        }
      };
      if (threads == 1) {
        lap::SerialGrid grid;
        lap::SerialTeam team;
        run(grid, team);
        continue;
      }
      // Even thread counts pair up into groups of two lanes, so the auction's lane-strided row
      // scans and group reductions run as on the GPU (in warps of 32 there).
      const int64_t lanes = threads % 2 == 0 ? 2 : 1;
      lap::HostTeamShared shared(threads);
      auto group_shares = lap::make_group_shares(threads, lanes);
      std::vector<std::thread> pool;
      for (int64_t r = 0; r < threads; ++r) {
        pool.emplace_back([&, r] {
          lap::HostThreadGrid grid(shared, *group_shares[r / lanes], r, threads, lanes);
          lap::HostThreadTeam team(shared, r, threads);
          run(grid, team);
        });
      }
      for (auto& t : pool) t.join();
    }
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_sum_assignment_team_cpu(
    const at::Tensor& cost_in, bool maximize, int64_t threads, c10::string_view solver_name) {
  const char* op = "_linear_sum_assignment_team";
  check_cost(cost_in, op);
  TORCH_CHECK_VALUE(threads >= 1 && threads <= 64, op, ": threads should be in [1, 64], got ",
                    threads);
  const Solver solver = parse_solver(solver_name, op);
  TORCH_CHECK_VALUE(solver != Solver::kAuto, op, ": solver should be 'jv' or 'auction', got 'auto'");
  check_solver_shape(solver, cost_in.size(-2), cost_in.size(-1), op);
  const auto [cost, batched] = prepare_cost(cost_in);
  SolveOutputs out(cost, true);
  at::Tensor status = at::zeros({cost.size(0), 2}, cost.options().dtype(at::kLong));
  solve_on_host_threads(cost, maximize, threads, solver, out, status.data_ptr<int64_t>());
  raise_on_failure(op, status, cost, batched, maximize);
  return out.result(batched, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(nat, CPU, m) {
  m.impl("_linear_sum_assignment_team", &linear_sum_assignment_team_cpu);
}

}  // namespace nat
